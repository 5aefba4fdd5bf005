"""The TFDS family of sources: a data set already prepared by TFDS.

`open_tfds` reads a data set already prepared in a local TFDS data_dir
(cifar10, svhn_cropped, imagenet2012, ...). The stored image bytes are
passed through (PNG for CIFAR/SVHN, JPEG for ImageNet). Never downloads: an
unprepared data set is an immediate error saying how to prepare it. TFDS is
read sequentially, in its own (already shuffled) order. Kept apart from the
other families (`array_source.py`, `folder_source.py`), which share only the
`sources.py` interface with it; tensorflow-datasets is imported only here,
and only when a TFDS source is opened.
"""

import os
import re
from typing import Iterator, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from mpl_tf import storage
from mpl_tf.data import records
from mpl_tf.data import sources

AUTOTUNE = tf.data.AUTOTUNE
# The TFDS split used as the test split when none is named. ImageNet's
# labeled held-out split is 'validation' (its 'test' split has label -1).
_DEFAULT_TEST_SPLITS = {'cifar10': 'test', 'cifar100': 'test',
                        'svhn_cropped': 'test', 'imagenet2012': 'validation'}
_LABEL_BATCH = 8192


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


class TfdsSplit(sources.SourceSplit):
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

  def read(self, indices: np.ndarray, decode: bool) -> Iterator[sources.Record]:
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
      yield sources.Record(int(index), int(label), encoded,
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
              test_split: Optional[str] = 'auto') -> sources.Source:
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
  return sources.Source(kind='tfds', name=name, train=train, test=test,
                        num_classes=int(label_feature.num_classes),
                        class_names=list(label_feature.names),
                        details={'tfds_name': name, 'data_dir': data_dir,
                                 'version': str(builder.info.version),
                                 'train_split': train_split,
                                 'test_split': test_split})
