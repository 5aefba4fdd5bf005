"""The one TFRecord schema of mpl_tf: writer and parser side by side.

Every prepared data set (the offline ones made by `offline.py`, and the ones
made by `python prepare.py`) is a directory of TFRecord shards
plus a `manifest.json`. Keeping the writer and the parser in one module
means they cannot drift apart (the checker of prepared records,
`record_checks.py`, reads the schema from here), and the manifest lets the
input pipeline size its padding and normalise without a pass over the data.

Each record is a `tf.train.Example` with two features:

* `image/encoded` (bytes): a JPEG or PNG image with 3 channels. Arrays are
  encoded as PNG (lossless); files that already are RGB JPEG or PNG (ImageNet,
  a folder of photos) are stored byte for byte, never re-encoded, so no
  quality is lost and preparing ImageNet decodes nothing.
* `image/class/label` (int64): the 0-based class index.

Relation to the released code's ImageNet records: the key names are the
same, but the released records store a 1-based `image/class/label` (1..1000)
and its parser subtracts 1. Ours are 0-based on disk and nothing is
subtracted. To reuse records written for the released code, rewrite each
example with `label = released_label - 1` (the image bytes unchanged); a
released record whose label is 0 is not a valid class there either.

Shards of a split are `{split}-{i:05d}-of-{num_shards:05d}.tfrecord`. Each
shard is written under a temporary name and renamed when complete, so a
crashed writer never leaves a file that looks finished. The manifest lists
each split's shards with their record counts (`shards`), and readers take
that list, never a glob of the folder (`split_shards`, shard_list.py).
"""

import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from mpl_tf import storage
from mpl_tf.data import shard_list
# The shard names and sizes of every writer, defined with the manifest's
# list of shards (shard_list.py) and kept here under their old names.
from mpl_tf.data.shard_list import num_shards_for, shard_name, shard_sizes

IMAGE_KEY = 'image/encoded'
LABEL_KEY = 'image/class/label'
MANIFEST_NAME = 'manifest.json'
SPLITS = ('labeled', 'unlabeled', 'validation', 'test')
# Bumped when the record or manifest layout changes incompatibly.
SCHEMA_VERSION = 1

_FEATURES = {
    IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
    LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
}
_JPEG_MAGIC = b'\xff\xd8\xff'
# The files a prepared set consists of, and the temporary names they are
# written under (`<name>.tmp-<pid>`: SplitWriter, storage.write_json).
_TEMPORARY = re.compile(r'(?P<final>.+)\.tmp-\d+')
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def is_temporary(name: str) -> bool:
  """Whether a file name is one a writer here uses until it renames it."""
  return _TEMPORARY.fullmatch(name) is not None


def is_prepared_file(name: str) -> bool:
  """Whether a file name is a shard or manifest, or a temporary of one.

  Only files named so are ever removed from a directory a set is replaced
  in; any other file there is someone else's.
  """
  temporary = _TEMPORARY.fullmatch(name)
  final = temporary.group('final') if temporary else name
  return final == MANIFEST_NAME or shard_list.SHARD.fullmatch(final) is not None


def image_format(encoded: bytes) -> Optional[str]:
  """'jpeg' or 'png' from the leading magic bytes; None for anything else."""
  if encoded.startswith(_JPEG_MAGIC):
    return 'jpeg'
  if encoded.startswith(_PNG_MAGIC):
    return 'png'
  return None


def _bytes_feature(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64_feature(value: int) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def serialize_encoded(encoded: bytes, label: int) -> bytes:
  """A tf.train.Example of already encoded JPEG/PNG bytes and a label."""
  example = tf.train.Example(features=tf.train.Features(feature={
      IMAGE_KEY: _bytes_feature(encoded),
      LABEL_KEY: _int64_feature(int(label)),
  }))
  return example.SerializeToString()


def encode_png(image: np.ndarray) -> bytes:
  """One uint8 [H, W, C] image as PNG bytes (lossless)."""
  return tf.io.encode_png(tf.constant(image, dtype=tf.uint8)).numpy()


def serialize_example(image: np.ndarray, label: int) -> bytes:
  """One uint8 [H, W, C] image, PNG-encoded, and its 0-based label."""
  return serialize_encoded(encode_png(image), label)


def check_label(label: int, num_classes: Optional[int]) -> None:
  """ValueError unless 0 <= label < num_classes (or >= 0 if unknown)."""
  if label < 0 or (num_classes is not None and label >= num_classes):
    bound = '' if num_classes is None else f' and < num_classes={num_classes}'
    raise ValueError(
        f'label {label} is out of range: labels are 0-based class indices, '
        f'>= 0{bound}. Shift 1-based labels down by 1 (the released code\'s '
        f'ImageNet labels are 1-based), or fix num_classes.')


def _check_split_arrays(images: np.ndarray, labels: np.ndarray,
                        num_classes: Optional[int]) -> None:
  if images.dtype != np.uint8:
    raise ValueError(
        f'images must be uint8 (0..255); got {images.dtype}. Convert with '
        f'np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for 0..1 '
        f'floats, or .astype(np.uint8) for integers in 0..255.')
  if images.ndim != 4:
    raise ValueError(
        f'images must have rank 4, [N, H, W, C]; got shape {images.shape}. '
        f'Add a channel axis to gray images with images[..., None].')
  if images.shape[-1] not in (1, 3):
    raise ValueError(f'images must have 1 or 3 channels (last axis); got '
                     f'shape {images.shape}. Move the channel axis last '
                     f'(np.moveaxis(images, 1, -1) for NCHW).')
  if labels.shape != (images.shape[0],):
    raise ValueError(f'labels must have shape ({images.shape[0]},), one per '
                     f'image; got {labels.shape}. Pass equally long images '
                     f'and labels, with integer class indices.')
  if labels.size:
    check_label(int(labels.min()), num_classes)
    check_label(int(labels.max()), num_classes)


class SplitWriter:
  """Writes one split's records, in order, into its numbered shards.

  The number of records must be known up front, because the shard names
  carry the shard count. Each shard is written under a temporary name and
  renamed when it is full; `abort()` (or leaving a `with` block by an
  exception) removes the unfinished one.
  """

  def __init__(self, out_dir: str, split: str, num_records: int,
               num_shards: int = 1, num_classes: Optional[int] = None):
    if num_shards < 1:
      raise ValueError(f'num_shards={num_shards} must be at least 1.')
    if num_records < 0:
      raise ValueError(f'num_records={num_records} must be >= 0.')
    tf.io.gfile.makedirs(out_dir)
    self._out_dir, self._split = out_dir, split
    self._num_classes = num_classes
    self._sizes = shard_sizes(num_records, num_shards)
    self._shard = -1
    self._left_in_shard = 0
    self._written = 0
    self._writer = None
    self._temporary_path = None
    self.paths: List[str] = []
    self._open_next_shard()

  def manifest_entries(self) -> List[Dict[str, Any]]:
    """The split's shards as the manifest lists them (names, records)."""
    return shard_list.manifest_entries(self._split, self._sizes)

  def _final_path(self, index: int) -> str:
    return os.path.join(self._out_dir,
                        shard_name(self._split, index, len(self._sizes)))

  def _finish_shard(self) -> None:
    self._writer.close()
    self._writer = None
    path = self._final_path(self._shard)
    tf.io.gfile.rename(self._temporary_path, path, overwrite=True)
    self._temporary_path = None
    self.paths.append(path)

  def _open_next_shard(self) -> None:
    self._shard += 1
    self._left_in_shard = self._sizes[self._shard]
    self._temporary_path = f'{self._final_path(self._shard)}.tmp-{os.getpid()}'
    self._writer = tf.io.TFRecordWriter(self._temporary_path)

  def write(self, encoded: bytes, label: int) -> None:
    """Appends one record: JPEG/PNG bytes with 3 channels, 0-based label."""
    if image_format(encoded) is None:
      raise ValueError(
          f'Split {self._split!r}: image/encoded must be JPEG or PNG bytes; '
          f'got {encoded[:8]!r}... Encode arrays with serialize_example() '
          f'or tf.io.encode_png.')
    check_label(int(label), self._num_classes)
    while self._left_in_shard == 0:
      if self._shard + 1 == len(self._sizes):
        raise ValueError(f'Split {self._split!r}: more records than the '
                         f'{sum(self._sizes)} announced.')
      self._finish_shard()
      self._open_next_shard()
    self._writer.write(serialize_encoded(encoded, label))
    self._left_in_shard -= 1
    self._written += 1

  def close(self) -> List[str]:
    """Finishes every shard (empty ones too); returns the shard paths."""
    if self._written != sum(self._sizes):
      self.abort()
      raise ValueError(f'Split {self._split!r}: {sum(self._sizes)} records '
                       f'were announced but {self._written} written.')
    while self._writer is not None:
      self._finish_shard()
      if self._shard + 1 < len(self._sizes):
        self._open_next_shard()
    return self.paths

  def abort(self) -> None:
    """Drops the unfinished shard; finished ones stay (no manifest = unused)."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if self._temporary_path and tf.io.gfile.exists(self._temporary_path):
      tf.io.gfile.remove(self._temporary_path)

  def __enter__(self) -> 'SplitWriter':
    return self

  def __exit__(self, exc_type, exc_value, traceback) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_split(out_dir: str, split: str, images: np.ndarray,
                labels: np.ndarray, num_shards: int = 1,
                num_classes: Optional[int] = None) -> List[str]:
  """Writes one split of uint8 arrays (PNG) as `num_shards` files.

  Args:
    out_dir: directory to write into (created if missing).
    split: split name, e.g. 'labeled'.
    images: uint8 [N, H, W, C] with C in {1, 3}.
    labels: integer [N], 0-based.
    num_shards: number of files; images are cut into contiguous pieces.
    num_classes: if given, labels must be below it.

  Returns:
    The shard paths, in order.
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be integer class indices; got '
                     f'{labels.dtype}. Map class names to 0-based indices.')
  _check_split_arrays(images, labels.astype(np.int64), num_classes)
  with SplitWriter(out_dir, split, images.shape[0], num_shards,
                   num_classes) as writer:
    for image, label in zip(images, labels):
      writer.write(encode_png(image), int(label))
  return writer.paths


def decode_image(encoded: tf.Tensor, channels: int = 3) -> tf.Tensor:
  """JPEG or PNG bytes to uint8 [H, W, channels] (first frame of a GIF)."""
  return tf.io.decode_image(encoded, channels=channels,
                            expand_animations=False)


def parse_encoded(serialized: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """(encoded image bytes, int32 label), for pipelines that decode later.

  ImageNet-style pipelines can then crop while decoding a JPEG
  (tf.image.decode_and_crop_jpeg) instead of decoding the full image.
  """
  features = tf.io.parse_single_example(serialized, _FEATURES)
  return features[IMAGE_KEY], tf.cast(features[LABEL_KEY], tf.int32)


def parse_example(serialized: tf.Tensor, image_size: Optional[int],
                  channels: int = 3) -> Tuple[tf.Tensor, tf.Tensor]:
  """Parses one serialized example into (uint8 [H, W, C], int32 label).

  With an integer `image_size`, the image gets the static shape
  [image_size, image_size, channels] and a run-time check that the stored
  image has it. With `image_size=None` (ImageNet, folders of mixed sizes) the
  shape is [None, None, channels].
  """
  encoded, label = parse_encoded(serialized)
  image = decode_image(encoded, channels)
  if image_size is not None:
    image = tf.ensure_shape(image, [image_size, image_size, channels])
  return image, label


def split_shards(data_dir: str, split: str,
                 manifest: Optional[Dict[str, Any]] = None,
                 check_folder: bool = True) -> List[shard_list.Shard]:
  """The split's shards (path, records) that manifest.json lists.

  The manifest's list, not a glob: shard files it does not list (left by an
  earlier preparation) are named in a warning and never read; a listed one
  that is missing is a FileNotFoundError. `manifest`: the set's manifest
  (read from `data_dir` when None; a directory without one, such as shards
  written by hand before their manifest, must hold one complete set).
  `check_folder=False`: no listing when the manifest lists the shards (see
  shard_list.split_shards).
  """
  if manifest is None:
    try:
      manifest = read_manifest(data_dir)
    except FileNotFoundError:
      manifest = {}
  return shard_list.split_shards(data_dir, split, manifest,
                                 check_folder=check_folder)


def split_files(data_dir: str, split: str,
                manifest: Optional[Dict[str, Any]] = None) -> List[str]:
  """The paths of `split_shards`, in shard order."""
  return [shard.path for shard in split_shards(data_dir, split, manifest)]


def write_manifest(data_dir: str, manifest: Dict[str, Any]) -> str:
  """Writes `manifest.json` atomically (storage.write_json); its path."""
  path = os.path.join(data_dir, MANIFEST_NAME)
  storage.write_json(path, manifest)
  return path


def read_manifest(data_dir: str) -> Dict[str, Any]:
  """Reads `manifest.json`; FileNotFoundError naming the fix if missing.

  The manifest is the completion marker of a prepared set: it is written
  after every shard (and, on file systems without atomic directory renames,
  moved into place last and removed first), so only a directory that has
  one is trusted. It is opened, not tested with exists(): an exists() that
  races with a writer, or that matches names by prefix (TF's ram://), could
  otherwise pass for a file that cannot be read.
  """
  path = os.path.join(data_dir, MANIFEST_NAME)
  fix = ('Prepare it again into an empty directory: an offline set (mnist5k, '
         'digits) by training with --dataset set to it, any other with '
         '`python prepare.py --out_dir=...` (docs/data.md).')
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      text = f.read()
  except tf.errors.NotFoundError:
    raise FileNotFoundError(
        f'No {MANIFEST_NAME} in {data_dir!r}: the data set there is not '
        f'prepared. For an offline data set (mnist5k, digits) call '
        f'mpl_tf.data.offline.ensure_prepared() or run training with '
        f'--dataset set to it and --data_dir={data_dir}; for any other, run '
        f'`python prepare.py --out_dir={data_dir} ...` (see '
        f'docs/data.md).') from None
  except tf.errors.OpError as error:
    raise ValueError(f'{path} cannot be read ({error.message.strip()}): the '
                     f'prepared data set in {data_dir!r} is damaged. '
                     f'{fix}') from None
  try:
    manifest = json.loads(text)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(
        f'{path} is not valid JSON ({error}): the prepared data set in '
        f'{data_dir!r} is damaged (a copy or write cut off?). {fix}') from None
  if not isinstance(manifest, dict):
    raise ValueError(f'{path} holds a JSON {type(manifest).__name__}, not '
                     f'the object of a manifest: the prepared data set in '
                     f'{data_dir!r} is damaged. {fix}')
  return manifest
