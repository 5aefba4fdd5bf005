"""The folder family of sources: image files, one sub-folder per class.

`open_folder` lists the class sub-folders of a train folder (and of an
optional test folder); the class index is the position of the sub-folder's
name in sorted order. RGB JPEG and PNG files are passed through; gray, RGBA,
GIF or BMP files are converted to RGB PNG. Read in any order asked for. Each
file is sized from its header (`image_header.py`) before it is decoded, so a
small file announcing a huge image is refused, not decoded. Kept apart from
the other families (`array_source.py`, `tfds_source.py`), which share only
the `sources.py` interface with it.
"""

import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from mpl_tf import storage
from mpl_tf.data import image_header
from mpl_tf.data import records
from mpl_tf.data import sources

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


def _header_allows_decoding(encoded) -> np.bool_:
  """image_header.check inside tf.data: raises (the element is dropped)."""
  image_header.check(encoded.item() if isinstance(encoded, np.ndarray)
                     else encoded, 'in the stream')
  return np.bool_(True)


def _to_rgb(image: np.ndarray) -> np.ndarray:
  """Gray, gray+alpha or RGBA uint8 [H, W, C] to RGB (alpha dropped)."""
  if image.shape[-1] in (1, 2):
    return np.repeat(image[..., :1], 3, axis=-1)
  return image[..., :3]


class FolderSplit(sources.SourceSplit):
  """Image files; decoded in parallel, passed through when RGB JPEG/PNG."""

  def __init__(self, description: str, paths: Sequence[str],
               labels: np.ndarray):
    super().__init__(description, labels, sequential=False)
    self.paths = list(paths)

  def _error(self, index: int) -> ValueError:
    """Reads one file eagerly to report why it failed, naming it.

    Its header is checked again first: a file refused for its size is
    never decoded, here either.
    """
    path = self.paths[index]
    try:
      encoded = storage.read_bytes(path)
      image_header.check(encoded, path)
      records.decode_image(tf.constant(encoded), channels=0)
      reason = 'it could not be read'
    except ValueError as error:
      return error
    except tf.errors.OpError as error:
      reason = error.message.strip()
    return ValueError(f'Cannot use image file {path}: {reason}. Remove or '
                      f'replace it, then run the command again.')

  def read(self, indices: np.ndarray, decode: bool) -> Iterator[sources.Record]:
    del decode  # Files are always decoded: their channels must be checked.
    indices = np.asarray(indices, np.int64)
    paths = [self.paths[i] for i in indices]

    def load(index, path):
      encoded = tf.io.read_file(path)
      # Stateful: a stateless op that only gates another by a control
      # dependency is pruned from the function, and the check never runs.
      allowed = tf.numpy_function(_header_allows_decoding, [encoded], tf.bool,
                                  stateful=True)
      with tf.control_dependencies([allowed]):
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
        encoded = records.encode_png(rgb)
      yield sources.Record(int(index), int(self.labels[index]), encoded, rgb)
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


def open_folder(train_dir: str,
                test_dir: Optional[str] = None) -> sources.Source:
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
  return sources.Source(kind='folder', name=storage.split(train_dir)[1],
                        train=train, test=test, num_classes=len(class_names),
                        class_names=class_names, details=details)
