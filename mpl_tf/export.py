"""The serving contract: SavedModel export, prediction on files, evaluation.

Training ends with checkpoints of networks that take *normalised* float32
images; whoever serves the model should not have to know the crop, the
resize or the per-channel constants of the data set it was trained on. So the
export owns that preprocessing: it restores the EMA student (the model the
paper reports) into a freshly built network and wraps it in one signature,
`serving_default`, that takes raw uint8 pixels and returns logits,
probabilities and classes. docs/export.md states the contract; this module is
the only place that implements it, and `--mode=export|predict|eval` in
main.py call the functions here with a Config (this module reads no flags).

Contract of `serving_default`:
  input   `images`: uint8 [N, H, W, 3], RGB pixels 0..255, N >= 1.
          'inception' data: any H and W (all images of one call share them);
          each image's centred square of `eval_crop_fraction` of its short
          side is resized bicubically to image_size, as in evaluation.
          'pad_crop' data: H = W = image_size, else an error naming the
          expected shape. Images are not resized, because the network never
          saw resized images of such data (CIFAR, SVHN, digits) in training.
  outputs `logits` float32 [N, K], `probabilities` float32 [N, K] (softmax),
          `classes` int64 [N] (argmax).
The export directory also holds `assets.extra/mpl_tf_export.json`: class
names, image size, crop, normalisation and the run's config. It is written
last and is the export's completion marker: a directory without it (an
export or a copy still running, or interrupted) is refused by every reader
here (`is_export`, `load_serving`, `evaluate`), with a message saying so.
"""

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from mpl_tf import config as config_lib
from mpl_tf import storage
from mpl_tf.data import augment
from mpl_tf.data import pipeline
from mpl_tf.data import records
from mpl_tf.evaluate import Evaluator
from mpl_tf.models import build_model

SIGNATURE_KEY = 'serving_default'
INPUT_KEY = 'images'
METADATA_DIR = 'assets.extra'
METADATA_NAME = 'mpl_tf_export.json'
# The completion marker, relative to the export directory.
METADATA_PATH = f'{METADATA_DIR}/{METADATA_NAME}'
_SAVED_MODEL_NAME = 'saved_model.pb'
# Bumped when the signature or the metadata change incompatibly.
FORMAT_VERSION = 1
# The items of a training checkpoint that hold a network of the run.
_DEFAULT_ITEM = 'ema_student'
_PREDICT_BATCH_SIZE = 32


# --------------------------------------------------------------------------
# Checkpoints.


def _strip_checkpoint_suffix(path: str) -> str:
  """'ckpt-3.index' or 'ckpt-3.data-00000-of-00001' -> 'ckpt-3'."""
  if path.endswith('.index'):
    return path[:-len('.index')]
  if '.data-' in os.path.basename(path):
    return path[:path.rindex('.data-')]
  return path


def _checkpoint_prefixes(directory: str) -> List[str]:
  pattern = os.path.join(directory, '*.index')
  return sorted(os.path.basename(p)[:-len('.index')]
                for p in tf.io.gfile.glob(pattern))


def resolve_checkpoint(path: str) -> str:
  """The checkpoint prefix that `path` names.

  `path` may be
    * a prefix, `model_dir/checkpoints/ckpt-1000` (a `.index` or `.data-*`
      suffix is dropped);
    * a directory written by a tf.train.CheckpointManager: its latest
      checkpoint;
    * a run's model_dir: its best-on-validation EMA student
      (`checkpoints/best/best-<step>`) if evaluation kept one, else its
      latest training checkpoint (`checkpoints/ckpt-<step>`).

  In a directory only what its `checkpoint` state file names is taken: the
  manager writes that file after the checkpoint is complete, while a
  `*.index` lying there may belong to a write that was cut short (or to a
  checkpoint the manager already gave up). Such files are listed in the
  error, to be passed as explicit prefixes. A prefix is recognised before a
  directory, because some file systems (TF's ram://) call any prefix of a
  file name a directory.

  Raises:
    FileNotFoundError: nothing there; the message lists what there is.
  """
  prefix = _strip_checkpoint_suffix(path)
  if tf.io.gfile.exists(prefix + '.index'):
    return prefix
  if tf.io.gfile.isdir(path):
    return _checkpoint_in_directory(path)
  raise FileNotFoundError(
      f'No checkpoint at {path!r} (there is no {prefix}.index). Pass a '
      f'checkpoint prefix such as model_dir/checkpoints/ckpt-1000 (without '
      f'.index or .data-*), a checkpoint directory for its latest '
      f'checkpoint, or a model_dir.')


def _checkpoint_in_directory(path: str) -> str:
  """What the first state file of path, checkpoints/best/, checkpoints/ names.

  Raises:
    FileNotFoundError: no state file names a checkpoint; the message says
      what the directory holds instead.
  """
  directories = [path, os.path.join(path, 'checkpoints', 'best'),
                 os.path.join(path, 'checkpoints')]
  directories = [d for d in directories if tf.io.gfile.isdir(d)]
  for directory in directories:
    latest = tf.train.latest_checkpoint(directory)
    if latest:
      return latest
  if is_export(path):
    raise FileNotFoundError(
        f'{path!r} is an export (a SavedModel), not a checkpoint; pass the '
        f'model_dir of the run or a checkpoint prefix.')
  if _looks_like_export(path):
    raise FileNotFoundError(_incomplete_export_message(path))
  found = [os.path.join(d, name) for d in directories
           for name in _checkpoint_prefixes(d)]
  hint = (f'it holds {", ".join(found)} without a `checkpoint` state file '
          f'naming them, so they may be incomplete; pass one of them to use '
          f'it anyway' if found else
          'train first (python main.py --flagfile=...), or pass the '
          'model_dir of a run or a checkpoint prefix')
  raise FileNotFoundError(
      f'No checkpoint in directory {path!r} (nor in its checkpoints/best/ '
      f'or checkpoints/): {hint}.')


def _checkpoint_items(prefix: str) -> List[str]:
  """Top-level names of a checkpoint (e.g. ema_student, student, step).

  Read with a reader of the prefix itself: tf.train.list_variables first
  asks whether the path is a directory, which TF's ram:// answers yes for
  any prefix of a file name.
  """
  reader = tf.compat.v1.train.NewCheckpointReader(prefix)
  names = {name.split('/')[0]
           for name in reader.get_variable_to_shape_map()}
  return sorted(names - {'_CHECKPOINTABLE_OBJECT_GRAPH', 'save_counter'})


def restore_model(config: config_lib.Config, manifest: Dict[str, Any],
                  checkpoint_path: str,
                  item: str = _DEFAULT_ITEM) -> keras.Model:
  """Builds the run's network and restores one item of a checkpoint into it.

  Only `item` (by default the EMA student) is read; teacher, optimizers and
  step are skipped. Every variable of the network must be found in the
  checkpoint, so a checkpoint of another item, architecture or number of
  classes fails here instead of serving an initialised network.

  Raises:
    FileNotFoundError: no checkpoint at `checkpoint_path` (resolve_checkpoint).
    ValueError: the checkpoint has no such item, or its shapes do not fit.
  """
  prefix = resolve_checkpoint(checkpoint_path)
  num_classes = int(manifest['num_classes'])
  model = build_model(config.model, num_classes, config.data.image_size, item)
  fix = (f'Use the config and data set the run was trained with '
         f'(model_dir/config.json); this one builds {config.model.name} '
         f'with {num_classes} classes')
  items = _checkpoint_items(prefix)
  if item not in items:
    raise ValueError(
        f'Checkpoint {prefix!r} has no {item!r} (it holds: '
        f'{", ".join(items) or "nothing"}). Pass a checkpoint written by '
        f'MPL training (model_dir/checkpoints/ckpt-N or '
        f'model_dir/checkpoints/best/best-N), or the model_dir itself.')
  try:
    status = tf.train.Checkpoint(**{item: model}).read(prefix)
    status.expect_partial()
    status.assert_existing_objects_matched()
  except (AssertionError, ValueError) as error:
    raise ValueError(f'Checkpoint {prefix!r} does not fit the network: '
                     f'{str(error)[:300]}. {fix}.') from None
  return model


# --------------------------------------------------------------------------
# Export.


def _preprocess(images: tf.Tensor, image_size: int, crop: str,
                eval_crop_fraction: float, mean: Sequence[float],
                std: Sequence[float]) -> tf.Tensor:
  """uint8 [N, H, W, 3] -> normalised float32 [N, S, S, 3], with checks.

  The checks are graph ops, not Python, so a SavedModel fed through TF
  Serving or `loaded.signatures[...]` (which check only the dtype) fails with
  a message instead of reaching a convolution with the wrong rank, which can
  abort the whole process inside oneDNN.
  """
  if crop == 'inception':
    expected = 'uint8 [N, H, W, 3] with N >= 1 (any H and W)'
  else:
    expected = (f'uint8 [N, {image_size}, {image_size}, 3] with N >= 1 (this '
                f'export does not resize; resize or crop to {image_size}x'
                f'{image_size} first)')
  # One message for every check: which one fires for a given wrong shape
  # depends on what Grappler folds away using the signature's static shape.
  message = (f'images must be {expected}: a batch of RGB pixels 0..255 (add a '
             f'batch axis to a single image; convert grayscale or RGBA to '
             f'RGB). Shape received:')
  shape = tf.shape(images)
  conditions = [tf.equal(tf.size(shape), 4), tf.equal(shape[-1], 3),
                tf.greater(shape[0], 0)]
  if crop != 'inception':
    conditions.append(tf.reduce_all(tf.equal(shape[1:3], image_size)))
  checks = [tf.debugging.Assert(condition, [message, shape], summarize=8)
            for condition in conditions]
  with tf.control_dependencies(checks):
    images = tf.identity(images)
  images = tf.ensure_shape(images, [None, None, None, 3])
  if crop == 'inception':
    images = tf.map_fn(
        lambda image: augment.center_crop(image, image_size,
                                          eval_crop_fraction),
        images, fn_output_signature=tf.TensorSpec(
            [image_size, image_size, 3], tf.float32))
  else:
    images = tf.ensure_shape(images, [None, image_size, image_size, 3])
  return augment.normalize(images, mean, std)


class _ServingModule(tf.Module):
  """The network plus the preprocessing that makes it take raw pixels."""

  def __init__(self, model: keras.Model, image_size: int, crop: str,
               eval_crop_fraction: float, mean: Sequence[float],
               std: Sequence[float]):
    super().__init__(name='mpl_tf_serving')
    self.model = model
    preprocess_args = dict(image_size=image_size, crop=crop,
                           eval_crop_fraction=eval_crop_fraction,
                           mean=[float(m) for m in mean],
                           std=[float(s) for s in std])

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_KEY)])
    def serve(images):
      inputs = _preprocess(images, **preprocess_args)
      logits = tf.cast(self.model(inputs, training=False), tf.float32)
      return {'logits': logits,
              'probabilities': tf.nn.softmax(logits, axis=-1),
              'classes': tf.argmax(logits, axis=-1, output_type=tf.int64)}

    self.serve = serve


def is_export(path: str) -> bool:
  """Whether `path` is a complete mpl_tf export (else: a checkpoint).

  Complete means its marker, the metadata written last, is there.
  """
  return tf.io.gfile.exists(os.path.join(path, METADATA_PATH))


def _looks_like_export(path: str) -> bool:
  """Whether `path` holds SavedModel files, complete or not."""
  return any(tf.io.gfile.exists(os.path.join(path, name))
             for name in (_SAVED_MODEL_NAME, 'variables', METADATA_DIR))


def _incomplete_export_message(path: str) -> str:
  return (f'{path!r} holds SavedModel files but no {METADATA_PATH}, which an '
          f'mpl_tf export writes last: the export (or a copy of it) is still '
          f'being written or was interrupted, or it is not an mpl_tf export. '
          f'Wait for it to finish, or export again: python main.py '
          f'--flagfile=... --mode=export --export_dir={path}.')


def _check_replaceable(export_dir: str) -> None:
  """Only an export (complete or not) or an empty directory is replaced."""
  if not tf.io.gfile.exists(export_dir):
    return
  if not tf.io.gfile.isdir(export_dir):
    raise ValueError(f'export_dir {export_dir!r} is a file; pass a directory '
                     f'path (it is created).')
  if not _looks_like_export(export_dir) and storage.listdir(export_dir):
    raise ValueError(
        f'export_dir {export_dir!r} exists and is not a SavedModel; refusing '
        f'to replace it. Pass a new directory (e.g. model_dir/export/1).')


def _metadata(config: config_lib.Config, manifest: Dict[str, Any],
              checkpoint: str) -> Dict[str, Any]:
  data = config.data
  num_classes = int(manifest['num_classes'])
  class_names = manifest.get('class_names')
  return {
      'format_version': FORMAT_VERSION,
      'signature': SIGNATURE_KEY,
      'inputs': {INPUT_KEY: 'uint8 [N, H, W, 3] RGB 0..255' if
                 data.crop == 'inception' else
                 f'uint8 [N, {data.image_size}, {data.image_size}, 3] RGB '
                 f'0..255'},
      'outputs': {'logits': f'float32 [N, {num_classes}]',
                  'probabilities': f'float32 [N, {num_classes}]',
                  'classes': 'int64 [N]'},
      'num_classes': num_classes,
      'class_names': None if class_names is None else list(class_names),
      'image_size': data.image_size,
      'crop': data.crop,
      'eval_crop_fraction': data.eval_crop_fraction,
      'mean': [float(m) for m in manifest['mean']],
      'std': [float(s) for s in manifest['std']],
      'dataset': manifest.get('dataset', data.dataset),
      'model': config.model.name,
      'checkpoint': checkpoint,
      'tensorflow_version': tf.__version__,
      'keras_version': keras.__version__,
      'config': config.to_dict(),
  }


def export_saved_model(config: config_lib.Config, manifest: Dict[str, Any],
                       checkpoint_path: str, export_dir: str) -> str:
  """Exports the EMA student of a checkpoint as a SavedModel; returns its path.

  The export is written to a hidden sibling directory (TF Serving ignores
  it) and put in place when complete; an earlier export there is replaced
  (anything else there is refused, so a mistyped path cannot delete a run).
  For TF Serving, pass a numbered version directory, e.g.
  `model_dir/export/1`.

  Locally the directory is renamed into place, so `export_dir` never holds
  half an export. Where a directory rename is a copy of each file (gs://,
  see storage.py), the files are moved one by one: the old export's marker
  is removed first, then the old files; the new saved_model.pb comes after
  variables/ and assets/, and the marker last. Readers here refuse the
  directory until the marker is there. TF Serving, which knows nothing of
  the marker, can still see the version directory while it fills: before
  saved_model.pb arrives a load fails (it retries); once saved_model.pb is
  there the SavedModel is complete. Replacing a version that a server
  reloads during the move makes that reload fail, so on remote storage
  export each model to a new version number.

  Raises:
    FileNotFoundError: no checkpoint at `checkpoint_path`.
    ValueError: the checkpoint does not fit the config, or export_dir holds
      something other than an export.
  """
  class_names = manifest.get('class_names')
  num_classes = int(manifest['num_classes'])
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(f'The manifest has {len(class_names)} class_names for '
                     f'{num_classes} classes; prepare the data set again.')
  export_dir = export_dir.rstrip('/') or export_dir
  _check_replaceable(export_dir)
  prefix = resolve_checkpoint(checkpoint_path)
  model = restore_model(config, manifest, prefix)
  data = config.data
  module = _ServingModule(model, data.image_size, data.crop,
                          data.eval_crop_fraction, manifest['mean'],
                          manifest['std'])
  new_dir = storage.hidden_sibling(export_dir, 'tmp')
  try:
    tf.saved_model.save(module, new_dir,
                        signatures={SIGNATURE_KEY: module.serve})
    tf.io.gfile.makedirs(os.path.join(new_dir, METADATA_DIR))
    with tf.io.gfile.GFile(os.path.join(new_dir, METADATA_PATH), 'w') as f:
      f.write(json.dumps(_metadata(config, manifest, prefix), indent=2,
                         sort_keys=True))
    storage.replace_directory(new_dir, export_dir,
                              last=(_SAVED_MODEL_NAME, METADATA_PATH))
  finally:
    if tf.io.gfile.exists(new_dir):
      storage.rmtree(new_dir)
  return export_dir


# --------------------------------------------------------------------------
# Loading and prediction.


class ServingModel:
  """A loaded export: the raw signature, its metadata and checked calls.

  `signature` is exactly what TF Serving runs; calling the object checks the
  input in Python first, so a wrong dtype or shape is a ValueError that says
  what to pass instead of a TensorFlow error from inside the graph.
  """

  def __init__(self, export_dir: str):
    if not is_export(export_dir):
      if _looks_like_export(export_dir):
        raise FileNotFoundError(_incomplete_export_message(export_dir))
      raise FileNotFoundError(
          f'No SavedModel in {export_dir!r}; export one first: python '
          f'main.py --flagfile=... --mode=export --export_dir={export_dir}.')
    self.export_dir = export_dir
    # The marker first: once it is read, the files before it are complete.
    with tf.io.gfile.GFile(os.path.join(export_dir, METADATA_PATH), 'r') as f:
      self.metadata = json.loads(f.read())
    self._loaded = tf.saved_model.load(export_dir)
    self.signature = self._loaded.signatures[SIGNATURE_KEY]
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
    outputs = self.signature(**{INPUT_KEY: tf.convert_to_tensor(images)})
    return {key: value.numpy() for key, value in outputs.items()}


def load_serving(export_dir: str) -> ServingModel:
  """Loads an export written by `export_saved_model`."""
  return ServingModel(export_dir)


def _as_serving(export: Union[str, ServingModel]) -> ServingModel:
  return export if isinstance(export, ServingModel) else load_serving(export)


def _decode_file(path: str) -> np.ndarray:
  """uint8 RGB [H, W, 3] of a PNG/JPEG/GIF/BMP file; ValueError naming it."""
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      encoded = f.read()
  except tf.errors.OpError as error:
    raise ValueError(f'Cannot read image file {path!r}: '
                     f'{error.message}') from None
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
  serving = _as_serving(export)
  paths = list(paths)
  missing = [path for path in paths if not tf.io.gfile.exists(path)]
  if missing:
    raise ValueError(f'Image file(s) not found: {", ".join(missing)}.')
  results: List[Optional[Dict[str, Any]]] = [None] * len(paths)
  for start in range(0, len(paths), batch_size):
    by_shape: Dict[tuple, List[int]] = {}
    images = {}
    for index in range(start, min(start + batch_size, len(paths))):
      image = _decode_file(paths[index])
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


# --------------------------------------------------------------------------
# Evaluation.


def eval_images(config: config_lib.Config, manifest: Dict[str, Any],
                split: str, batch_size: Optional[int] = None
                ) -> tf.data.Dataset:
  """(uint8 images [n, H, W, 3], int32 labels [n]) batches of a split.

  The raw pixels, as an export takes them (`pipeline.eval_dataset` gives
  the already cropped and normalised view, for Keras models). Images of one
  size are batched together; the last batches may be smaller.
  """
  pipeline.check_manifest(config, manifest)
  batch_size = batch_size or config.run.eval_batch_size
  image_size = manifest.get('image_size')
  dataset = tf.data.TFRecordDataset(
      records.split_files(config.data.data_dir, split))
  dataset = dataset.map(
      lambda serialized: records.parse_example(serialized, image_size, 3),
      num_parallel_calls=tf.data.AUTOTUNE)
  if image_size is not None:
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)

  def size_key(image, unused_label):
    shape = tf.cast(tf.shape(image), tf.int64)
    return shape[0] * (1 << 31) + shape[1]

  return dataset.group_by_window(
      size_key, lambda unused_key, window: window.batch(batch_size),
      window_size=batch_size).prefetch(tf.data.AUTOTUNE)


def evaluate_saved_model(export: Union[str, ServingModel],
                         dataset: Iterable) -> Dict[str, float]:
  """Top-1, top-5 (top-K if K < 5) and loss of an export on a dataset.

  `dataset` yields (uint8 images [n, H, W, 3], integer labels [n]), e.g.
  `eval_images(...)`. Returns the keys of `Evaluator`: top1, top5, loss,
  count, so a checkpoint and its export can be compared directly.
  """
  serving = _as_serving(export)
  k = min(5, serving.num_classes)
  top1 = topk = loss = 0.0
  count = 0
  for images, labels in dataset:
    labels = np.asarray(labels).astype(np.int64)
    if labels.size and (labels.min() < 0 or
                        labels.max() >= serving.num_classes):
      raise ValueError(
          f'A label outside [0, {serving.num_classes}) in the evaluation '
          f'set: the export {serving.export_dir!r} was trained on another '
          f'data set.')
    logits = tf.constant(serving(images)['logits'])
    label_tensor = tf.constant(labels, tf.int32)
    top1 += float(tf.reduce_sum(tf.cast(
        tf.math.in_top_k(label_tensor, logits, 1), tf.float32)))
    topk += float(tf.reduce_sum(tf.cast(
        tf.math.in_top_k(label_tensor, logits, k), tf.float32)))
    loss += float(tf.reduce_sum(
        tf.nn.sparse_softmax_cross_entropy_with_logits(label_tensor, logits)))
    count += int(labels.size)
  if count == 0:
    raise ValueError('the evaluation set is empty.')
  return {'top1': top1 / count, 'top5': topk / count, 'loss': loss / count,
          'count': count}


def evaluate_checkpoint(config: config_lib.Config, manifest: Dict[str, Any],
                        checkpoint_path: str, split: str = 'test',
                        item: str = _DEFAULT_ITEM) -> Dict[str, float]:
  """Top-1/top-5/loss of a checkpoint's EMA student (or `item`) on a split.

  The same model, data view and Evaluator as the training loop's
  evaluation, so the numbers match what training reported.
  """
  model = restore_model(config, manifest, checkpoint_path, item)
  dataset = pipeline.eval_dataset(config, manifest, split,
                                  config.run.eval_batch_size)
  try:
    return Evaluator()(model, dataset)
  except tf.errors.OpError as error:
    problem = pipeline.find_input_problem(config, manifest, (split,))
    if problem is None:
      raise
    raise problem from error


def evaluate(config: config_lib.Config, manifest: Dict[str, Any],
             checkpoint_or_export: str, split: str) -> Dict[str, float]:
  """`--mode=eval`: a SavedModel directory or a checkpoint, on one split.

  An export is fed the split's raw pixels and preprocesses them itself, so
  this also checks the serving path; a checkpoint (prefix, directory or
  model_dir, see resolve_checkpoint) is evaluated as training does.
  """
  if is_export(checkpoint_or_export):
    serving = load_serving(checkpoint_or_export)
    if serving.num_classes != int(manifest['num_classes']):
      raise ValueError(
          f'The export {checkpoint_or_export!r} has {serving.num_classes} '
          f'classes but the data in {config.data.data_dir!r} has '
          f'{manifest["num_classes"]}; evaluate it on its own data set.')
    return evaluate_saved_model(serving, eval_images(config, manifest, split))
  return evaluate_checkpoint(config, manifest, checkpoint_or_export, split)
