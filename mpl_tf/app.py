"""What `main.py --mode=...` does with a Config: train, eval, export, predict.

Kept apart from the loop (train.py owns training) and from the serving
contract (export.py owns it): this module only picks the checkpoint or
export a mode works on and prints what it found.
"""

import json
import os
from typing import Any, Dict

from mpl_tf import export
from mpl_tf import train
from mpl_tf.config import Config, ConfigError
from mpl_tf.data import offline

# TF Serving loads numbered versions of a model directory.
_EXPORT_VERSION = '1'


def default_checkpoint(config: Config) -> str:
  """What eval and export use without --checkpoint.

  The finetuned student when the run has a finetuning stage, else the run's
  model_dir, where export.resolve_checkpoint takes the best-on-validation EMA
  student, or the latest training checkpoint.
  """
  if config.run.checkpoint:
    return config.run.checkpoint
  finetuned = os.path.join(config.run.model_dir, 'finetune', 'checkpoints')
  if config.finetune.steps and os.path.isdir(finetuned):
    return finetuned
  return config.run.model_dir


def default_export_dir(config: Config) -> str:
  return config.run.export_dir or os.path.join(
      config.run.model_dir, 'export', _EXPORT_VERSION)


def run(config: Config) -> Dict[str, Any]:
  """Runs `config.run.mode`; returns what it printed, as a dict."""
  mode = config.run.mode
  if mode == 'train':
    return train.run(config)
  manifest = offline.ensure_prepared(config.data)
  if mode == 'export':
    checkpoint = export.resolve_checkpoint(default_checkpoint(config))
    path = export.export_saved_model(config, manifest, checkpoint,
                                     default_export_dir(config))
    print(f'exported {checkpoint} to {path}')
    return {'checkpoint': checkpoint, 'export_dir': path}
  if mode == 'eval':
    target = default_checkpoint(config)
    if not export.is_export(target):
      target = export.resolve_checkpoint(target)
    results = {split: export.evaluate(config, manifest, target, split)
               for split in ('validation', 'test')}
    print(f'evaluated {target}')
    print(json.dumps(results, indent=2, sort_keys=True))
    return results
  if mode == 'predict':
    if not config.run.predict_files:
      raise ConfigError('--mode=predict needs --predict_files (comma-separated '
                        'image files or globs).')
    paths = export.expand_file_patterns(config.run.predict_files)
    predictions = export.predict_files(default_export_dir(config), paths)
    for prediction in predictions:
      name = prediction.get('class_name')
      columns = [prediction['file'], str(prediction['class']),
                 '' if name is None else str(name),
                 f'{prediction["probability"]:.4f}']
      print('\t'.join(columns))
    return {'predictions': predictions}
  raise ConfigError(f'mode={mode!r} is not train, eval, export or predict.')
