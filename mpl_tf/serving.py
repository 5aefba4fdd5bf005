"""The client of an export: loading it, checked calls, prediction on files.

export.py writes a SavedModel whose `serving_default` signature takes raw
uint8 pixels (docs/export.md states the contract); this module is its
client in Python. `ServingModel` loads an export, refusing a directory
without the completion marker, and checks inputs before the signature sees
them, so a wrong dtype or shape is a message saying what to pass;
`predict_files` (`--mode=predict` in main.py) classifies image files with
it. It reads only the export's names (export_format.py), never its writer.
"""

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from mpl_tf import export_format
from mpl_tf.data import image_header
from mpl_tf.data import records

_PREDICT_BATCH_SIZE = 32


class ServingModel:
  """A loaded export: the raw signature, its metadata and checked calls.

  `signature` is exactly what TF Serving runs; calling the object checks the
  input in Python first, so a wrong dtype or shape is a ValueError that says
  what to pass instead of a TensorFlow error from inside the graph.
  """

  def __init__(self, export_dir: str):
    if not export_format.is_export(export_dir):
      if export_format.looks_like_export(export_dir):
        raise FileNotFoundError(
            export_format.incomplete_export_message(export_dir))
      raise FileNotFoundError(
          f'No SavedModel in {export_dir!r}; export one first: python '
          f'main.py --flagfile=... --mode=export --export_dir={export_dir}.')
    self.export_dir = export_dir
    # The marker first: once it is read, the files before it are complete.
    marker = os.path.join(export_dir, export_format.METADATA_PATH)
    with tf.io.gfile.GFile(marker, 'r') as f:
      self.metadata = json.loads(f.read())
    self._loaded = tf.saved_model.load(export_dir)
    self.signature = self._loaded.signatures[export_format.SIGNATURE_KEY]
    self.image_size = int(self.metadata['image_size'])
    self.crop = self.metadata['crop']
    self.num_classes = int(self.metadata['num_classes'])
    self.class_names = self.metadata.get('class_names')

  def check_images(self, images, source: str = 'images') -> None:
    """Raises ValueError unless `images` fit the signature."""
    dtype = tf.as_dtype(images.dtype)
    shape = tuple(images.shape)
    expected = ('uint8 [N, H, W, 3]' if self.crop == 'inception' else
                f'uint8 [N, {self.image_size}, {self.image_size}, 3]')
    if dtype != tf.uint8:
      raise ValueError(
          f'{source} are {dtype.name}; the export takes {expected} pixels on '
          f'the 0..255 scale and normalises them itself. Pass the decoded '
          f'pixels (not normalised values) as uint8.')
    if len(shape) != 4 or shape[-1] != 3:
      raise ValueError(
          f'{source} have shape {list(shape)}; the export takes {expected} '
          f'(a batch of RGB images: add a batch axis to a single image, '
          f'convert grayscale or RGBA to RGB).')
    if shape[0] == 0:
      raise ValueError(f'{source} is an empty batch; pass at least one image.')
    if self.crop != 'inception' and shape[1:3] != (self.image_size,) * 2:
      raise ValueError(
          f'{source} are {shape[1]}x{shape[2]}; this model was trained on '
          f'{self.image_size}x{self.image_size} images ({expected}) and does '
          f'not resize. Resize or crop them to that size first.')

  def __call__(self, images) -> Dict[str, np.ndarray]:
    """{'logits', 'probabilities', 'classes'} of a uint8 batch, as numpy."""
    if not isinstance(images, tf.Tensor):
      images = np.asarray(images)
    self.check_images(images)
    outputs = self.signature(
        **{export_format.INPUT_KEY: tf.convert_to_tensor(images)})
    return {key: value.numpy() for key, value in outputs.items()}


def load_serving(export_dir: str) -> ServingModel:
  """Loads an export written by `export_saved_model`."""
  return ServingModel(export_dir)


def as_serving(export: Union[str, ServingModel]) -> ServingModel:
  """`export` if already loaded, else the export directory it names, loaded."""
  return export if isinstance(export, ServingModel) else load_serving(export)


def _read_file(path: str) -> bytes:
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      return f.read()
  except tf.errors.OpError as error:
    raise ValueError(f'Cannot read image file {path!r}: '
                     f'{error.message}') from None


def _decode_file(path: str, serving: Optional[ServingModel] = None
                 ) -> np.ndarray:
  """uint8 RGB [H, W, 3] of a PNG/JPEG/GIF/BMP file; ValueError naming it.

  Its size is checked from the header first (image_header.py): against the
  pixel limit and, given `serving`, against the sizes the export takes, so
  an image that would be refused is never decoded.
  """
  encoded = _read_file(path)
  header = image_header.check(encoded, repr(path))
  if header is not None and serving is not None:
    serving.check_images(tf.TensorSpec([1, header.height, header.width, 3],
                                       tf.uint8), source=repr(path))
  try:
    return records.decode_image(tf.constant(encoded), channels=3).numpy()
  except tf.errors.OpError as error:
    raise ValueError(f'{path!r} is not an image TensorFlow can decode (PNG, '
                     f'JPEG, GIF or BMP): {error.message.strip()}') from None


def expand_file_patterns(patterns: str) -> List[str]:
  """'a.png,photos/*.jpg' -> the files, in order (globs sorted).

  Raises:
    ValueError: no patterns, or a pattern that matches no file.
  """
  paths = []
  for pattern in (p.strip() for p in patterns.split(',')):
    if not pattern:
      continue
    if any(character in pattern for character in '*?['):
      matches = sorted(tf.io.gfile.glob(pattern))
      if not matches:
        raise ValueError(f'No file matches {pattern!r}.')
      paths.extend(matches)
    else:
      paths.append(pattern)
  if not paths:
    raise ValueError('No image files given; pass --predict_files=a.png,'
                     'b.jpg or a glob such as photos/*.jpg.')
  return paths


def predict_files(export: Union[str, ServingModel], paths: Sequence[str],
                  batch_size: int = _PREDICT_BATCH_SIZE
                  ) -> List[Dict[str, Any]]:
  """Classifies image files with an export, in the order given.

  Files are decoded as RGB (grayscale is repeated, alpha dropped), and
  batched by size (`batch_size` at a time) because one call takes images of
  one size. All paths are checked to exist before any work.

  Args:
    export: an export directory or a loaded ServingModel.
    paths: PNG, JPEG, GIF or BMP files.
    batch_size: images per call of the signature.

  Returns:
    One dict per file: `file`, `class` (int), `class_name` (str, or None
    when the data set has no names) and `probability` (of that class).

  Raises:
    ValueError: a file is missing or cannot be decoded, or (for 'pad_crop'
      exports) is not image_size x image_size; the message names it.
  """
  serving = as_serving(export)
  paths = list(paths)
  missing = [path for path in paths if not tf.io.gfile.exists(path)]
  if missing:
    raise ValueError(f'Image file(s) not found: {", ".join(missing)}.')
  results: List[Optional[Dict[str, Any]]] = [None] * len(paths)
  for start in range(0, len(paths), batch_size):
    by_shape: Dict[tuple, List[int]] = {}
    images = {}
    for index in range(start, min(start + batch_size, len(paths))):
      image = _decode_file(paths[index], serving)
      serving.check_images(image[None], source=repr(paths[index]))
      images[index] = image
      by_shape.setdefault(image.shape, []).append(index)
    for indices in by_shape.values():
      outputs = serving(np.stack([images[i] for i in indices]))
      for row, index in enumerate(indices):
        label = int(outputs['classes'][row])
        results[index] = {
            'file': paths[index], 'class': label,
            'class_name': (serving.class_names[label]
                           if serving.class_names else None),
            'probability': float(outputs['probabilities'][row, label])}
  return results