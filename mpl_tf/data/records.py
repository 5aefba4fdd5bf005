"""The one TFRecord schema of mpl_tf, written and read in this module only.

Every prepared data set (the offline ones made by `offline.py`, and any larger
one prepared elsewhere) is a directory of TFRecord shards plus a
`manifest.json`. Keeping the writer and the parser side by side means the two
directions cannot drift apart, and the manifest lets the input pipeline size
its padding and normalise without a pass over the data.

Each example has two features:

* `image/encoded`: PNG bytes of a uint8 image [H, W, C].
* `image/class/label`: int64, 0-based class index.

Note: the released Meta Pseudo Labels code writes its ImageNet records with a
1-based `image/class/label` and subtracts 1 when it parses them. Here labels
are 0-based on disk, so nothing is subtracted; records converted from the
released format must have 1 subtracted when they are rewritten.

Shard files are named `{split}-{i:05d}-of-{num_shards:05d}.tfrecord`.
"""

import json
import os
from typing import Any, Dict, List, Tuple

import numpy as np
import tensorflow as tf

IMAGE_KEY = 'image/encoded'
LABEL_KEY = 'image/class/label'
MANIFEST_NAME = 'manifest.json'
SPLITS = ('labeled', 'unlabeled', 'validation', 'test')

_FEATURES = {
    IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
    LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
}


def shard_name(split: str, index: int, num_shards: int) -> str:
  """The file name of shard `index` of `num_shards` of a split."""
  return f'{split}-{index:05d}-of-{num_shards:05d}.tfrecord'


def _bytes_feature(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64_feature(value: int) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def serialize_example(image: np.ndarray, label: int) -> bytes:
  """One uint8 [H, W, C] image and its 0-based label as a tf.train.Example."""
  png = tf.io.encode_png(tf.constant(image, dtype=tf.uint8)).numpy()
  example = tf.train.Example(features=tf.train.Features(feature={
      IMAGE_KEY: _bytes_feature(png),
      LABEL_KEY: _int64_feature(int(label)),
  }))
  return example.SerializeToString()


def _check_split_arrays(images: np.ndarray, labels: np.ndarray) -> None:
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'images must be uint8 [N, H, W, C]; got {images.dtype} '
                     f'with shape {images.shape}.')
  if images.shape[-1] not in (1, 3):
    raise ValueError(f'images must have 1 or 3 channels; got {images.shape}.')
  if labels.shape != (images.shape[0],):
    raise ValueError(f'labels must have shape ({images.shape[0]},) to match '
                     f'the images; got {labels.shape}.')
  if labels.size and labels.min() < 0:
    raise ValueError('labels must be 0-based class indices (>= 0); '
                     f'got a minimum of {labels.min()}.')


def _write_shard(path: str, images: np.ndarray, labels: np.ndarray) -> None:
  """Writes to a temporary name, then renames, so no half file is left."""
  temporary_path = f'{path}.tmp-{os.getpid()}'
  try:
    with tf.io.TFRecordWriter(temporary_path) as writer:
      for image, label in zip(images, labels):
        writer.write(serialize_example(image, label))
    tf.io.gfile.rename(temporary_path, path, overwrite=True)
  finally:
    if tf.io.gfile.exists(temporary_path):
      tf.io.gfile.remove(temporary_path)


def write_split(out_dir: str, split: str, images: np.ndarray,
                labels: np.ndarray, num_shards: int = 1) -> List[str]:
  """Writes one split as `num_shards` TFRecord files; returns their paths.

  Args:
    out_dir: directory to write into (created if missing).
    split: split name, e.g. 'labeled'.
    images: uint8 [N, H, W, C].
    labels: integer [N], 0-based.
    num_shards: number of files; images are cut into contiguous pieces.
  """
  images = np.asarray(images)
  labels = np.asarray(labels).astype(np.int64)
  _check_split_arrays(images, labels)
  if num_shards < 1:
    raise ValueError(f'num_shards={num_shards} must be at least 1.')
  tf.io.gfile.makedirs(out_dir)
  paths = []
  shards = zip(np.array_split(images, num_shards),
               np.array_split(labels, num_shards))
  for index, (shard_images, shard_labels) in enumerate(shards):
    path = os.path.join(out_dir, shard_name(split, index, num_shards))
    _write_shard(path, shard_images, shard_labels)
    paths.append(path)
  return paths


def parse_example(serialized: tf.Tensor, image_size: int,
                  channels: int = 3) -> Tuple[tf.Tensor, tf.Tensor]:
  """Parses one serialized example into (uint8 [H, W, C], int32 label).

  The image gets the static shape [image_size, image_size, channels] (and a
  run-time check that the stored image has it).
  """
  features = tf.io.parse_single_example(serialized, _FEATURES)
  image = tf.io.decode_png(features[IMAGE_KEY], channels=channels)
  image = tf.ensure_shape(image, [image_size, image_size, channels])
  label = tf.cast(features[LABEL_KEY], tf.int32)
  return image, label


def split_files(data_dir: str, split: str) -> List[str]:
  """The sorted shard files of a split; FileNotFoundError if there are none."""
  pattern = os.path.join(data_dir, f'{split}-*-of-*.tfrecord')
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise FileNotFoundError(
        f'No TFRecord files for split {split!r} in {data_dir!r} (looked for '
        f'{pattern}). Prepare the data set first: for an offline data set '
        f'(mnist5k, digits) run training with --dataset set to it and '
        f'--data_dir={data_dir}, which prepares it, or call '
        f'mpl_tf.data.offline.prepare(); otherwise write the splits with '
        f'mpl_tf.data.records.write_split().')
  return files


def write_manifest(data_dir: str, manifest: Dict[str, Any]) -> str:
  """Writes `manifest.json` atomically (temporary name, then rename)."""
  tf.io.gfile.makedirs(data_dir)
  path = os.path.join(data_dir, MANIFEST_NAME)
  temporary_path = f'{path}.tmp-{os.getpid()}'
  with tf.io.gfile.GFile(temporary_path, 'w') as f:
    f.write(json.dumps(manifest, indent=2, sort_keys=True))
  tf.io.gfile.rename(temporary_path, path, overwrite=True)
  return path


def read_manifest(data_dir: str) -> Dict[str, Any]:
  """Reads `manifest.json`; FileNotFoundError naming the fix if missing."""
  path = os.path.join(data_dir, MANIFEST_NAME)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f'No {MANIFEST_NAME} in {data_dir!r}: the data set there is not '
        f'prepared. For an offline data set (mnist5k, digits) call '
        f'mpl_tf.data.offline.ensure_prepared() or run training with '
        f'--dataset set to it and --data_dir={data_dir}; otherwise write the '
        f'splits with records.write_split() and the manifest with '
        f'records.write_manifest().')
  with tf.io.gfile.GFile(path, 'r') as f:
    return json.loads(f.read())


def per_channel_mean_std(images: np.ndarray) -> Tuple[List[float],
                                                      List[float]]:
  """Per-channel mean and std of uint8 images on the 0..255 scale."""
  pixels = np.asarray(images, dtype=np.float64).reshape(-1, images.shape[-1])
  return pixels.mean(axis=0).tolist(), pixels.std(axis=0).tolist()
