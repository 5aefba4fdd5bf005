"""The serving contract: the SavedModel export of a trained network.

Training ends with checkpoints of networks that take *normalised* float32
images; whoever serves the model should not have to know the crop, the
resize or the per-channel constants of the data set it was trained on. So the
export owns that preprocessing: it restores the EMA student (the model the
paper reports) into a freshly built network and wraps it in one signature,
`serving_default`, that takes raw uint8 pixels and returns logits,
probabilities and classes. docs/export.md states the contract; this module is
the only place that implements it, and `--mode=export` in main.py calls it
with a Config (this module reads no flags). The names an export's readers
rely on are in export_format.py; loading an export and prediction on files
are in serving.py, evaluation of an export in evaluate.py.

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
(`export_format.is_export`, `serving.load_serving`, `evaluate.evaluate`),
with a message saying so.
"""

import json
import os
from typing import Any, Dict, Sequence

import keras
import tensorflow as tf

from mpl_tf import checkpoints
from mpl_tf import config as config_lib
from mpl_tf import export_format
from mpl_tf import storage
from mpl_tf.data import augment

# Bumped when the signature or the metadata change incompatibly.
FORMAT_VERSION = 1


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
        tf.TensorSpec([None, None, None, 3], tf.uint8,
                      name=export_format.INPUT_KEY)])
    def serve(images):
      inputs = _preprocess(images, **preprocess_args)
      logits = tf.cast(self.model(inputs, training=False), tf.float32)
      return {'logits': logits,
              'probabilities': tf.nn.softmax(logits, axis=-1),
              'classes': tf.argmax(logits, axis=-1, output_type=tf.int64)}

    self.serve = serve


def _check_replaceable(export_dir: str) -> None:
  """Only an export (complete or not) or an empty directory is replaced."""
  if not tf.io.gfile.exists(export_dir):
    return
  if not tf.io.gfile.isdir(export_dir):
    raise ValueError(f'export_dir {export_dir!r} is a file; pass a directory '
                     f'path (it is created).')
  if (not export_format.looks_like_export(export_dir) and
      storage.listdir(export_dir)):
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
      'signature': export_format.SIGNATURE_KEY,
      'inputs': {export_format.INPUT_KEY: 'uint8 [N, H, W, 3] RGB 0..255' if
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
  prefix = checkpoints.resolve_checkpoint(checkpoint_path)
  model = checkpoints.restore_model(config, manifest, prefix)
  data = config.data
  module = _ServingModule(model, data.image_size, data.crop,
                          data.eval_crop_fraction, manifest['mean'],
                          manifest['std'])
  new_dir = storage.hidden_sibling(export_dir, 'tmp')
  try:
    tf.saved_model.save(module, new_dir,
                        signatures={export_format.SIGNATURE_KEY: module.serve})
    tf.io.gfile.makedirs(os.path.join(new_dir, export_format.METADATA_DIR))
    marker = os.path.join(new_dir, export_format.METADATA_PATH)
    with tf.io.gfile.GFile(marker, 'w') as f:
      f.write(json.dumps(_metadata(config, manifest, prefix), indent=2,
                         sort_keys=True))
    storage.replace_directory(new_dir, export_dir,
                              last=(export_format.SAVED_MODEL_NAME,
                                    export_format.METADATA_PATH))
  finally:
    if tf.io.gfile.exists(new_dir):
      storage.rmtree(new_dir)
  return export_dir