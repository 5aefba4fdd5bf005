"""The array family of sources: uint8 images in memory, or in an .npz file.

`from_arrays` wraps in-memory uint8 [N, H, W, 3] images and 0-based labels
(the offline digit sets of `offline.py` use it); `open_npz` loads them from
an .npz. Images are encoded as PNG, in parallel, when they are read. Kept
apart from the other families (`folder_source.py`, `tfds_source.py`), which
share only the `sources.py` interface with it.
"""

from typing import Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf

from mpl_tf import storage
from mpl_tf.data import sources

AUTOTUNE = tf.data.AUTOTUNE


class ArraySplit(sources.SourceSplit):
  """uint8 [N, H, W, 3] images in memory, PNG-encoded in parallel."""

  def __init__(self, description: str, images: np.ndarray,
               labels: np.ndarray):
    images, labels = np.asarray(images), np.asarray(labels)
    _check_arrays(description, images, labels)
    super().__init__(description, labels, sequential=False,
                     image_shape=tuple(images.shape[1:3]))
    self.images = images

  def read(self, indices: np.ndarray, decode: bool) -> Iterator[sources.Record]:
    indices = np.asarray(indices, np.int64)
    height, width = self.image_shape
    dataset = tf.data.Dataset.from_generator(
        lambda: ((i, self.images[i]) for i in indices),
        output_signature=(tf.TensorSpec([], tf.int64),
                          tf.TensorSpec([height, width, 3], tf.uint8)))
    dataset = dataset.map(lambda i, image: (i, tf.io.encode_png(image)),
                          num_parallel_calls=AUTOTUNE, deterministic=True)
    for index, encoded in dataset.prefetch(AUTOTUNE).as_numpy_iterator():
      yield sources.Record(int(index), int(self.labels[index]), encoded,
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
                kind: str = 'arrays') -> sources.Source:
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
  return sources.Source(
      kind=kind, name=name, train=train, test=test, num_classes=num_classes,
      class_names=None if class_names is None else list(class_names))


_NPZ_KEYS = (('images', 'labels', 'test_images', 'test_labels'),
             ('x_train', 'y_train', 'x_test', 'y_test'))


def open_npz(path: str) -> sources.Source:
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
