"""What `main.py --mode=...` does with a Config: train, eval, export, predict.

Kept apart from the loop (train.py owns training) and from the serving
contract (export.py, serving.py and evaluate.py own it): this module only
picks the checkpoint or export a mode works on and prints what it found.

Every mode builds the configured strategy first (before any TensorFlow op,
as MultiWorkerMirroredStrategy requires). Evaluating a checkpoint runs on
it: every TPU core or GPU takes a share of the padded evaluation batches,
and the count is exact. Export and predict work on the host: a SavedModel
holds no device placement (TF Serving runs it on its own CPU or GPU), and
under multi-worker only the chief writes the export.
"""

import json
import os
from typing import Any, Dict

import tensorflow as tf

from mpl_tf import checkpoints
from mpl_tf import cluster
from mpl_tf import distribute
from mpl_tf import export
from mpl_tf import export_format
from mpl_tf import preflight
from mpl_tf import serving
from mpl_tf import train
from mpl_tf.config import Config, ConfigError
from mpl_tf.data import offline
from mpl_tf.data import records
from mpl_tf.evaluate import Evaluator, evaluate, evaluate_split
from mpl_tf.evaluations import check_finite_results

# TF Serving loads numbered versions of a model directory.
_EXPORT_VERSION = '1'


def default_checkpoint(config: Config) -> str:
  """What eval and export use without --checkpoint.

  The finetuned student when the run has a finetuning stage, else the run's
  model_dir, where checkpoints.resolve_checkpoint takes the best-on-validation
  EMA student, or the latest training checkpoint.
  """
  if config.run.checkpoint:
    return config.run.checkpoint
  finetuned = os.path.join(config.run.model_dir, 'finetune', 'checkpoints')
  # A complete checkpoint is one the state file names (a bucket has no
  # directories to test, and a half-written checkpoint must not be taken).
  if config.finetune.steps and tf.train.latest_checkpoint(finetuned):
    return finetuned
  return config.run.model_dir


def default_export_dir(config: Config) -> str:
  return config.run.export_dir or os.path.join(
      config.run.model_dir, 'export', _EXPORT_VERSION)


def predict_export(config: Config) -> str:
  """The export --mode=predict classifies with.

  --checkpoint when given (docs/export.md's form: it names the export, as
  it does for --mode=eval), else --export_dir, else model_dir/export/1.
  Prediction runs the serving signature, so a training checkpoint is
  refused with the export command that makes one from it; two different
  exports named by both flags are refused rather than one of them ignored.
  """
  checkpoint, export_dir = config.run.checkpoint, config.run.export_dir
  if checkpoint and export_dir and (
      checkpoint.rstrip('/') != export_dir.rstrip('/')):
    raise ConfigError(
        f'--mode=predict got --checkpoint={checkpoint} and --export_dir='
        f'{export_dir}, two exports; pass one of them (--checkpoint names '
        f'the export to predict with).')
  if not checkpoint:
    return default_export_dir(config)
  if (not export_format.is_export(checkpoint) and
      not export_format.looks_like_export(checkpoint) and
      _names_a_checkpoint(checkpoint)):
    raise ConfigError(
        f'--checkpoint={checkpoint} is a training checkpoint; --mode=predict '
        f'runs an export (the served model). Export it first: python main.py '
        f'--flagfile=... --mode=export --checkpoint={checkpoint} '
        f'--export_dir=DIR, then pass --checkpoint=DIR.')
  return checkpoint


def _names_a_checkpoint(path: str) -> bool:
  try:
    checkpoints.resolve_checkpoint(path)
  except FileNotFoundError:
    return False
  return True


def _evaluate_checkpoint(config: Config, manifest: Dict[str, Any],
                         checkpoint: str, strategy) -> Dict[str, Any]:
  """Validation and test of a checkpoint's network, on every replica."""
  distribute.check_batch_divides(strategy, 'eval_batch_size',
                                 config.run.eval_batch_size)
  with strategy.scope():
    model = checkpoints.restore_model(config, manifest, checkpoint)
  evaluator = Evaluator(strategy)
  return {split: evaluate_split(evaluator, config, manifest, model, split)
          for split in ('validation', 'test')}


def run(config: Config) -> Dict[str, Any]:
  """Runs `config.run.mode`; returns what it printed, as a dict."""
  mode = config.run.mode
  if mode == 'train':
    return train.run(config)
  strategy = distribute.get_strategy(config.run)
  preflight.check_paths(config)
  chief = cluster.is_chief(strategy)
  manifest = (offline.ensure_prepared(config.data) if chief else
              records.read_manifest(config.data.data_dir))
  if mode == 'export':
    checkpoint = checkpoints.resolve_checkpoint(default_checkpoint(config))
    path = default_export_dir(config)
    if chief:
      path = export.export_saved_model(config, manifest, checkpoint, path)
      print(f'exported {checkpoint} to {path}')
    return {'checkpoint': checkpoint, 'export_dir': path}
  if mode == 'eval':
    target = default_checkpoint(config)
    if export_format.is_export(target):
      # The serving signature, fed raw pixels on the host: this checks the
      # export as TF Serving would run it.
      results = {split: evaluate(config, manifest, target, split)
                 for split in ('validation', 'test')}
    else:
      target = checkpoints.resolve_checkpoint(target)
      results = _evaluate_checkpoint(config, manifest, target, strategy)
    print(f'evaluated {target} ({type(strategy).__name__}, '
          f'{strategy.num_replicas_in_sync} replica(s))')
    print(json.dumps(results, indent=2, sort_keys=True))
    check_finite_results({target: results}, f'evaluating {target!r}')
    return results
  if mode == 'predict':
    if not config.run.predict_files:
      raise ConfigError('--mode=predict needs --predict_files (comma-separated '
                        'image files or globs).')
    paths = serving.expand_file_patterns(config.run.predict_files)
    predictions = serving.predict_files(predict_export(config), paths)
    for prediction in predictions:
      name = prediction.get('class_name')
      columns = [prediction['file'], str(prediction['class']),
                 '' if name is None else str(name),
                 f'{prediction["probability"]:.4f}']
      print('\t'.join(columns))
    return {'predictions': predictions}
  raise ConfigError(f'mode={mode!r} is not train, eval, export or predict.')
