"""Readers of the data a prepared set is made from: TFDS, folders, arrays.

A source has a training split and, optionally, a test split. Each split
gives its labels up front (a cheap first pass, or the folder names) so the
split rules of `splits.py` can run before any image is read, and then
streams its images as encoded JPEG/PNG bytes, ready for `records.py`:

* TFDS (`open_tfds`): a data set already prepared in a local TFDS data_dir
  (cifar10, svhn_cropped, imagenet2012, ...). The stored image bytes are
  passed through (PNG for CIFAR/SVHN, JPEG for ImageNet). Never downloads:
  an unprepared data set is an immediate error saying how to prepare it.
  TFDS is read sequentially, in its own (already shuffled) order.
* A folder (`open_folder`) with one sub-folder per class; the class index is
  the position of the sub-folder's name in sorted order. RGB JPEG and PNG
  files are passed through; gray, RGBA, GIF or BMP files are converted to
  RGB PNG. Read in any order asked for.
* Arrays (`from_arrays`, `open_npz`): uint8 [N, H, W, 3] encoded as PNG.
"""

import abc
import dataclasses
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from mpl_tf import storage
from mpl_tf.data import records

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
# The TFDS split used as the test split when none is named. ImageNet's
# labeled held-out split is 'validation' (its 'test' split has label -1).
_DEFAULT_TEST_SPLITS = {'cifar10': 'test', 'cifar100': 'test',
                        'svhn_cropped': 'test', 'imagenet2012': 'validation'}
_LABEL_BATCH = 8192


@dataclasses.dataclass
class Record:
  """One image of a source split, ready to be written."""
  index: int
  label: int
  encoded: bytes                 # JPEG or PNG, 3 channels
  image: Optional[np.ndarray]    # uint8 [H, W, 3] when decoding was asked


class SourceSplit(abc.ABC):
  """One split of a source: labels up front, images streamed on demand."""

  def __init__(self, description: str, labels: np.ndarray,
               sequential: bool,
               image_shape: Optional[Tuple[int, int]] = None,
               positions: Optional[np.ndarray] = None):
    self.description = description
    self.labels = np.asarray(labels, np.int64)
    # True: `read` yields in source order, whatever order is asked for.
    self.sequential = sequential
    # (height, width) of every image if known without decoding, else None.
    self.image_shape = image_shape
    # Each record's position in the original file order, if it differs.
    self.positions = positions

  def __len__(self) -> int:
    return self.labels.shape[0]

  @abc.abstractmethod
  def read(self, indices: np.ndarray, decode: bool) -> Iterator[Record]:
    """Yields the records at `indices` (Record.image set if `decode`)."""


@dataclasses.dataclass
class Source:
  """A training split, an optional test split, and what the classes are."""
  kind: str                      # 'tfds', 'folder', 'npz' or 'arrays'
  name: str                      # e.g. 'cifar10', or a folder's base name
  train: SourceSplit
  test: Optional[SourceSplit]
  num_classes: int
  class_names: Optional[List[str]] = None
  details: Dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def description(self) -> str:
    return f'{self.kind}:{self.name}'


def _to_rgb(image: np.ndarray) -> np.ndarray:
  """Gray, gray+alpha or RGBA uint8 [H, W, C] to RGB (alpha dropped)."""
  if image.shape[-1] in (1, 2):
    return np.repeat(image[..., :1], 3, axis=-1)
  return image[..., :3]


def _png(image: np.ndarray) -> bytes:
  return tf.io.encode_png(tf.constant(image, tf.uint8)).numpy()


# ---------------------------------------------------------------------------
# Arrays.


class ArraySplit(SourceSplit):
  """uint8 [N, H, W, 3] images in memory, PNG-encoded in parallel."""

  def __init__(self, description: str, images: np.ndarray,
               labels: np.ndarray):
    images, labels = np.asarray(images), np.asarray(labels)
    _check_arrays(description, images, labels)
    super().__init__(description, labels, sequential=False,
                     image_shape=tuple(images.shape[1:3]))
    self.images = images

  def read(self, indices: np.ndarray, decode: bool) -> Iterator[Record]:
    indices = np.asarray(indices, np.int64)
    height, width = self.image_shape
    dataset = tf.data.Dataset.from_generator(
        lambda: ((i, self.images[i]) for i in indices),
        output_signature=(tf.TensorSpec([], tf.int64),
                          tf.TensorSpec([height, width, 3], tf.uint8)))
    dataset = dataset.map(lambda i, image: (i, tf.io.encode_png(image)),
                          num_parallel_calls=AUTOTUNE, deterministic=True)
    for index, encoded in dataset.prefetch(AUTOTUNE).as_numpy_iterator():
      yield Record(int(index), int(self.labels[index]), encoded,
                   self.images[index] if decode else None)


def _check_arrays(description: str, images: np.ndarray,
                  labels: np.ndarray) -> None:
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        f'{description}: images must be uint8 [N, H, W, 3]; got '
        f'{images.dtype} with shape {images.shape}. Convert gray images '
        f'with np.repeat(images[..., None], 3, axis=-1), NCHW with '
        f'np.moveaxis(images, 1, -1), floats in 0..1 with '
        f'(images * 255).round().astype(np.uint8).')
  if labels.shape != (images.shape[0],) or not np.issubdtype(
      labels.dtype, np.integer):
    raise ValueError(f'{description}: labels must be integers of shape '
                     f'({images.shape[0]},), one per image; got '
                     f'{labels.dtype} with shape {labels.shape}.')
  if labels.size and labels.min() < 0:
    raise ValueError(f'{description}: labels must be 0-based class indices; '
                     f'got {labels.min()}.')


def from_arrays(name: str, images: np.ndarray, labels: np.ndarray,
                test_images: Optional[np.ndarray] = None,
                test_labels: Optional[np.ndarray] = None,
                num_classes: Optional[int] = None,
                class_names: Optional[Sequence[str]] = None,
                kind: str = 'arrays') -> Source:
  """A source of in-memory uint8 [N, H, W, 3] arrays and 0-based labels."""
  train = ArraySplit(f'{name} train', images, labels)
  test = None
  if (test_images is None) != (test_labels is None):
    raise ValueError(f'{name}: give both test images and test labels, or '
                     f'neither.')
  if test_images is not None:
    test = ArraySplit(f'{name} test', test_images, test_labels)
  if class_names is not None:
    num_classes = len(class_names)
  if num_classes is None:
    num_classes = int(max(train.labels.max(),
                          test.labels.max() if test and len(test) else 0)) + 1
  return Source(kind=kind, name=name, train=train, test=test,
                num_classes=num_classes,
                class_names=None if class_names is None else list(class_names))


_NPZ_KEYS = (('images', 'labels', 'test_images', 'test_labels'),
             ('x_train', 'y_train', 'x_test', 'y_test'))


def open_npz(path: str) -> Source:
  """An .npz of images/labels (+ test_images/test_labels, class_names).

  The Keras names x_train/y_train/x_test/y_test work too. The arrays are
  loaded into memory; for more images than fit, use a folder. `path` may be
  on any file system TensorFlow reads (gs://...).
  """
  path = storage.absolute(path)
  if not storage.isfile(path):
    raise FileNotFoundError(f'No .npz file at {path!r}; pass --npz_path '
                            f'pointing at one.')
  with storage.load_npz(path) as arrays:
    for images_key, labels_key, test_images_key, test_labels_key in _NPZ_KEYS:
      if images_key in arrays.files and labels_key in arrays.files:
        break
    else:
      raise ValueError(
          f'{path} has arrays {arrays.files}; it needs "images" and "labels" '
          f'(optionally "test_images", "test_labels", "class_names"), or '
          f'x_train/y_train (optionally x_test/y_test).')
    test_images = (arrays[test_images_key]
                   if test_images_key in arrays.files else None)
    test_labels = (arrays[test_labels_key]
                   if test_labels_key in arrays.files else None)
    class_names = (arrays['class_names'].astype(str).tolist()
                   if 'class_names' in arrays.files else None)
    source = from_arrays(storage.split(path)[1], arrays[images_key],
                         arrays[labels_key].reshape(-1), test_images,
                         None if test_labels is None else
                         test_labels.reshape(-1),
                         class_names=class_names, kind='npz')
  source.details = {'path': path}
  return source


# ---------------------------------------------------------------------------
# A folder of images, one sub-folder per class.


class FolderSplit(SourceSplit):
  """Image files; decoded in parallel, passed through when RGB JPEG/PNG."""

  def __init__(self, description: str, paths: Sequence[str],
               labels: np.ndarray):
    super().__init__(description, labels, sequential=False)
    self.paths = list(paths)

  def _error(self, index: int) -> ValueError:
    """Decodes one file eagerly to report why it failed, naming it."""
    path = self.paths[index]
    try:
      records.decode_image(tf.io.read_file(path), channels=0)
      reason = 'it could not be read'
    except tf.errors.OpError as error:
      reason = error.message.strip()
    return ValueError(f'Cannot use image file {path}: {reason}. Remove or '
                      f'replace it, then run the command again.')

  def read(self, indices: np.ndarray, decode: bool) -> Iterator[Record]:
    del decode  # Files are always decoded: their channels must be checked.
    indices = np.asarray(indices, np.int64)
    paths = [self.paths[i] for i in indices]

    def load(index, path):
      encoded = tf.io.read_file(path)
      return index, encoded, records.decode_image(encoded, channels=0)

    dataset = tf.data.Dataset.from_tensor_slices(
        (indices, tf.constant(paths, tf.string)))
    dataset = dataset.map(load, num_parallel_calls=AUTOTUNE,
                          deterministic=True)
    # A bad file drops out of the stream; the gap in the indices names it.
    dataset = dataset.ignore_errors().prefetch(AUTOTUNE)
    position = 0
    for index, encoded, image in dataset.as_numpy_iterator():
      if index != indices[position]:
        raise self._error(indices[position])
      position += 1
      rgb = _to_rgb(image)
      if image.shape[-1] != 3 or records.image_format(encoded) is None:
        encoded = _png(rgb)
      yield Record(int(index), int(self.labels[index]), encoded, rgb)
    if position < len(indices):
      raise self._error(indices[position])


def _list_class_folder(root: str, class_names: Sequence[str], role: str
                       ) -> Tuple[List[str], np.ndarray]:
  paths, labels = [], []
  for label, class_name in enumerate(class_names):
    class_dir = os.path.join(root, class_name)
    if not tf.io.gfile.isdir(class_dir):
      continue
    for directory, _, files in sorted(storage.walk(class_dir)):
      for file_name in sorted(files):
        if (not file_name.startswith('.') and
            file_name.lower().endswith(IMAGE_EXTENSIONS)):
          paths.append(os.path.join(directory, file_name))
          labels.append(label)
  if not paths:
    raise ValueError(f'No image files ({", ".join(IMAGE_EXTENSIONS)}) in the '
                     f'class sub-folders of the {role} folder {root!r}.')
  return paths, np.asarray(labels, np.int64)


def _class_folders(root: str, role: str) -> List[str]:
  if not tf.io.gfile.isdir(root):
    raise FileNotFoundError(f'The {role} folder {root!r} does not exist.')
  names = sorted(name for name in storage.listdir(root)
                 if not name.startswith('.') and
                 tf.io.gfile.isdir(os.path.join(root, name)))
  if not names:
    raise ValueError(f'The {role} folder {root!r} has no sub-folders; put '
                     f'the images of each class in a sub-folder named after '
                     f'it (e.g. {root}/cat/1.jpg, {root}/dog/2.jpg).')
  return names


def open_folder(train_dir: str, test_dir: Optional[str] = None) -> Source:
  """Class sub-folders of `train_dir` (and the same names in `test_dir`).

  Class i is the i-th sub-folder name in sorted order; files in nested
  folders of a class folder belong to it. Hidden files and files of other
  extensions are skipped. The folders may be on any file system TensorFlow
  reads (gs://...).
  """
  train_dir = storage.absolute(train_dir)
  class_names = _class_folders(train_dir, 'train')
  if len(class_names) < 2:
    raise ValueError(
        f'The train folder {train_dir!r} has 1 class ({class_names[0]}): '
        f'a classifier needs at least 2 classes. Put the images of each '
        f'class in a sub-folder named after it (e.g. {train_dir}/cat/1.jpg, '
        f'{train_dir}/dog/2.jpg).')
  paths, labels = _list_class_folder(train_dir, class_names, 'train')
  train = FolderSplit(f'folder {train_dir}', paths, labels)
  test = None
  details = {'train_dir': train_dir}
  if test_dir:
    test_dir = storage.absolute(test_dir)
    extra = sorted(set(_class_folders(test_dir, 'test')) - set(class_names))
    if extra:
      raise ValueError(f'The test folder {test_dir!r} has classes '
                       f'{extra[:10]} that the train folder has not; the '
                       f'class sub-folders must have the same names.')
    test_paths, test_labels = _list_class_folder(test_dir, class_names,
                                                 'test')
    test = FolderSplit(f'folder {test_dir}', test_paths, test_labels)
    details['test_dir'] = test_dir
  return Source(kind='folder', name=storage.split(train_dir)[1], train=train,
                test=test, num_classes=len(class_names),
                class_names=class_names, details=details)


# ---------------------------------------------------------------------------
# TFDS.


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError('--source=tfds needs tensorflow-datasets: pip install '
                      'tensorflow-datasets') from None
  return tfds


def _how_to_prepare(name: str, data_dir: str, builder) -> str:
  """The steps that make a TFDS data set available in `data_dir`."""
  where = f'{data_dir}/{name}/{builder.info.version}'
  if name.startswith('imagenet2012'):
    manual_dir = os.path.join(data_dir, 'downloads', 'manual')
    return (
        f'TFDS data set {name!r} is not prepared in {data_dir!r} (no '
        f'{where}/dataset_info.json), and this command never downloads. '
        f'ImageNet is a manual download: after registering at '
        f'image-net.org, download ILSVRC2012_img_train.tar and '
        f'ILSVRC2012_img_val.tar, put them (unextracted) in {manual_dir}, '
        f'then run `tfds build {name} --data_dir={data_dir} '
        f'--manual_dir={manual_dir}` (it reads only those tars). Or point '
        f'--tfds_data_dir at a directory where {name} is already prepared.')
  return (
      f'TFDS data set {name!r} is not prepared in {data_dir!r} (no '
      f'{where}/dataset_info.json), and this command never downloads. On a '
      f'machine with internet access run `tfds build {name} '
      f'--data_dir={data_dir}` (or in Python: tfds.builder({name!r}, '
      f'data_dir=...).download_and_prepare()), copy the resulting {name}/ '
      f'folder here, or point --tfds_data_dir at a directory that has it.')


class TfdsSplit(SourceSplit):
  """A split of a prepared TFDS data set, read in TFDS's order."""

  def __init__(self, builder, split: str, image_channels: Optional[int],
               image_shape: Optional[Tuple[int, int]]):
    self._builder, self._split = builder, split
    self._convert = image_channels != 3
    labels, ids = self._labels_and_ids()
    super().__init__(f'tfds {builder.name}/{split}', labels, sequential=True,
                     image_shape=image_shape, positions=_positions(ids))

  def _dataset(self) -> tf.data.Dataset:
    tfds = _tfds()
    dataset = self._builder.as_dataset(
        split=self._split, shuffle_files=False,
        decoders={'image': tfds.decode.SkipDecoding()})
    options = tf.data.Options()
    options.deterministic = True
    return dataset.with_options(options)

  def _labels_and_ids(self) -> Tuple[np.ndarray, Optional[List[bytes]]]:
    """The first pass: labels (and ids), without decoding any image."""
    dataset = self._dataset()
    has_id = 'id' in dataset.element_spec
    dataset = dataset.map(
        lambda example: (example['label'],
                         example['id'] if has_id else tf.constant(b'')),
        num_parallel_calls=AUTOTUNE)
    labels, ids = [], []
    for label_batch, id_batch in dataset.batch(_LABEL_BATCH).prefetch(
        AUTOTUNE).as_numpy_iterator():
      labels.append(label_batch)
      ids.extend(id_batch.tolist())
    if not labels:
      raise ValueError(f'TFDS split {self._builder.name}/{self._split} is '
                       f'empty.')
    return np.concatenate(labels).astype(np.int64), ids if has_id else None

  def read(self, indices: np.ndarray, decode: bool) -> Iterator[Record]:
    wanted = np.zeros(len(self), bool)
    wanted[np.asarray(indices, np.int64)] = True
    wanted_tensor = tf.constant(wanted)
    convert = self._convert

    def load(index, example):
      encoded = example['image']
      if convert:
        # Gray (e.g. MNIST) or RGBA TFDS images become RGB PNG.
        image = records.decode_image(encoded, channels=3)
        encoded = tf.io.encode_png(image)
      elif decode:
        image = records.decode_image(encoded, channels=3)
      else:
        image = tf.zeros([0, 0, 3], tf.uint8)
      return index, example['label'], encoded, image

    dataset = self._dataset().enumerate()
    dataset = dataset.filter(lambda index, _: wanted_tensor[index])
    dataset = dataset.map(load, num_parallel_calls=AUTOTUNE,
                          deterministic=True).prefetch(AUTOTUNE)
    for index, label, encoded, image in dataset.as_numpy_iterator():
      if label != self.labels[index]:
        raise ValueError(
            f'{self.description} gave record {index} the label {label} on '
            f'the second pass but {self.labels[index]} on the first: TFDS '
            f'did not read in a stable order. Please report this.')
      yield Record(int(index), int(label), encoded,
                   image if decode else None)


def _positions(ids: Optional[List[bytes]]) -> Optional[np.ndarray]:
  """Original file positions from ids like b'train_01234', if all parse."""
  if not ids:
    return None
  positions = []
  for record_id in ids:
    match = re.fullmatch(rb'[a-z]+_(\d+)', record_id)
    if match is None:
      return None
    positions.append(int(match.group(1)))
  positions = np.asarray(positions, np.int64)
  if not np.array_equal(np.sort(positions), np.arange(positions.shape[0])):
    return None
  return positions


def open_tfds(name: str, data_dir: str, train_split: str = 'train',
              test_split: Optional[str] = 'auto') -> Source:
  """A TFDS data set already prepared in `data_dir`; never downloads.

  Args:
    name: TFDS name, e.g. 'cifar10', 'svhn_cropped', 'imagenet2012'.
    data_dir: the TFDS data_dir holding `<name>/<version>/`.
    train_split: TFDS split (expression) to draw labeled, unlabeled and
      validation images from, e.g. 'train' or 'train+extra'.
    test_split: TFDS split used as the test split; 'auto' picks 'validation'
      for imagenet2012 and 'test' otherwise; None or 'none' for no test
      split (then the split rule must hold one out of train).

  Returns:
    The source, after a first pass that reads every label.
  """
  tfds = _tfds()
  data_dir = storage.absolute(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f'TFDS has no data set named {name!r}; check '
                     f'--tfds_name (e.g. cifar10, svhn_cropped, '
                     f'imagenet2012).') from None
  if not builder.is_prepared():
    raise FileNotFoundError(_how_to_prepare(name, data_dir, builder))
  features = builder.info.features
  if 'image' not in features or 'label' not in features or not hasattr(
      features['label'], 'num_classes'):
    raise ValueError(f'TFDS data set {name!r} has features '
                     f'{list(features.keys())}; an image classification set '
                     f'with "image" and a class "label" is needed.')
  height, width, channels = features['image'].shape
  image_shape = (height, width) if height and width else None
  if test_split == 'auto':
    test_split = _DEFAULT_TEST_SPLITS.get(name, 'test')
  if test_split == 'none':
    test_split = None
  known_splits = list(builder.info.splits.keys())
  for split in filter(None, (train_split, test_split)):
    if known_splits:
      try:
        builder.info.splits[split]
      except Exception:  # pylint: disable=broad-except
        # TFDS raises KeyError, ValueError or AssertionError, by version.
        raise ValueError(f'TFDS data set {name!r} has no split {split!r}; '
                         f'it has {known_splits}.') from None
  train = TfdsSplit(builder, train_split, channels, image_shape)
  test = (TfdsSplit(builder, test_split, channels, image_shape)
          if test_split else None)
  label_feature = features['label']
  return Source(kind='tfds', name=name, train=train, test=test,
                num_classes=int(label_feature.num_classes),
                class_names=list(label_feature.names),
                details={'tfds_name': name, 'data_dir': data_dir,
                         'version': str(builder.info.version),
                         'train_split': train_split,
                         'test_split': test_split})
