"""Which checkpoint a path names, and one network restored from it.

Eval and export take a checkpoint prefix, a CheckpointManager directory or
a run's model_dir; `resolve_checkpoint` turns each into the prefix of a
complete checkpoint, and `restore_model` builds the run's network and reads
one item of that checkpoint (by default the EMA student, the model the paper
reports) into it. Kept apart from the export (export.py) because evaluating
a checkpoint (evaluate.py, app.py) needs the same restore without exporting.
"""

import os
from typing import Any, Dict, List

import keras
import tensorflow as tf

from mpl_tf import config as config_lib
from mpl_tf import export_format
from mpl_tf.models import build_model

# The items of a training checkpoint that hold a network of the run.
DEFAULT_ITEM = 'ema_student'


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
  if export_format.is_export(path):
    raise FileNotFoundError(
        f'{path!r} is an export (a SavedModel), not a checkpoint; pass the '
        f'model_dir of the run or a checkpoint prefix.')
  if export_format.looks_like_export(path):
    raise FileNotFoundError(export_format.incomplete_export_message(path))
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
                  item: str = DEFAULT_ITEM) -> keras.Model:
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