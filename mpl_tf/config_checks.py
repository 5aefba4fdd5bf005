"""The checks of a `Config`: each names the field and the fix.

Kept apart from config.py so that the dataclasses (what a run is) and the
rules over them (which runs are refused) each stay one readable file.
"""

import dataclasses
import math

from mpl_tf.config import (ALGORITHMS, BATCH_NORM_KERNELS, CROPS,
                           INPUT_SHARDINGS, MODES, NONFINITE_POLICIES,
                           OPTIMIZERS, PRECISIONS, RANDAUGMENT_OPS,
                           STRATEGIES, Config, ConfigError)


def check_choice(name: str, value: str, choices) -> None:
  if value not in choices:
    raise ConfigError(f'{name}={value!r} is not one of {", ".join(choices)}; '
                      f'pass one of them.')


def _check_positive(name: str, value) -> None:
  if value <= 0:
    raise ConfigError(f'{name}={value} must be positive.')


def _check_finite(config) -> None:
  """Every float field must be a finite number: nan passes `<= 0` checks."""
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      _check_finite(value)
    elif isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f'{field.name}={value} must be a finite number.')


def validate(config: Config) -> Config:
  """Raises ConfigError naming the field and the fix; returns the config."""
  _check_finite(config)
  mpl, optim, data = config.mpl, config.optim, config.data
  for field in dataclasses.fields(mpl):
    if 'choices' in field.metadata:
      check_choice(field.name, getattr(mpl, field.name),
                    field.metadata['choices'])
  if mpl.teacher_original_pass == 'no_grad' and mpl.student_view != 'aug':
    raise ConfigError('teacher_original_pass=no_grad needs student_view=aug: '
                      'with student_view=ori the pseudo labels, and so the '
                      'MPL term, come from the original view, which then '
                      'needs its backward pass.')
  check_choice('precision', config.model.precision, PRECISIONS)
  check_choice('batch_norm_kernel', config.model.batch_norm_kernel,
               BATCH_NORM_KERNELS)
  check_choice('randaugment_ops', data.randaugment_ops, RANDAUGMENT_OPS)
  check_choice('crop', data.crop, CROPS)
  check_choice('input_sharding', data.input_sharding, INPUT_SHARDINGS)
  if not 0.0 < data.eval_crop_fraction <= 1.0:
    raise ConfigError(f'eval_crop_fraction={data.eval_crop_fraction} must be '
                      f'in (0, 1].')
  if not 0.0 <= config.model.stochastic_depth_rate < 1.0:
    raise ConfigError(f'stochastic_depth_rate={config.model.stochastic_depth_rate} '
                      f'must be in [0, 1).')
  if not 0.0 <= config.model.dropout_rate < 1.0:
    raise ConfigError(f'dropout_rate={config.model.dropout_rate} must be in '
                      f'[0, 1).')
  if not 0.0 <= config.model.batch_norm_momentum < 1.0:
    raise ConfigError(f'batch_norm_momentum={config.model.batch_norm_momentum} '
                      f'must be in [0, 1) (the released code: 0.99).')
  _check_positive('batch_norm_epsilon', config.model.batch_norm_epsilon)
  if not 0.0 <= mpl.baseline_decay < 1.0:
    raise ConfigError(f'baseline_decay={mpl.baseline_decay} must be in [0, 1); '
                      f'0 turns the baseline off.')
  if not 0.0 <= mpl.label_smoothing < 1.0:
    raise ConfigError(f'label_smoothing={mpl.label_smoothing} must be in [0, 1).')
  if not 0.0 < mpl.uda_temperature:
    raise ConfigError(f'uda_temperature={mpl.uda_temperature} must be > 0.')
  if mpl.mpl_weight < 0:
    raise ConfigError(f'mpl_weight={mpl.mpl_weight} must be >= 0 '
                      f'(0 is the UDA-only ablation).')
  _check_positive('uda_steps', mpl.uda_steps)
  _check_positive('microbatches', mpl.microbatches)
  if mpl.microbatches > 1 and config.model.sync_batch_norm:
    raise ConfigError(f'microbatches={mpl.microbatches} computes batch-norm '
                      f'statistics per chunk, not over the synchronized whole '
                      f'batch; pass --nosync_batch_norm or --microbatches=1.')
  for name in ('labeled_batch_size', 'uda_ratio', 'num_steps', 'teacher_lr'):
    _check_positive(name, getattr(optim, name))
  check_choice('optimizer', optim.optimizer, OPTIMIZERS)
  if not 0.0 <= optim.momentum < 1.0:
    raise ConfigError(f'momentum={optim.momentum} must be in [0, 1).')
  if optim.weight_decay < 0:
    raise ConfigError(f'weight_decay={optim.weight_decay} must be >= 0.')
  if optim.student_lr < 0:
    raise ConfigError(f'student_lr={optim.student_lr} must be >= 0.')
  if not 0.0 <= optim.ema_decay < 1.0:
    raise ConfigError(f'ema_decay={optim.ema_decay} must be in [0, 1).')
  _check_positive('image_size', data.image_size)
  _check_positive('eval_batch_size', config.run.eval_batch_size)
  run = config.run
  check_choice('mode', run.mode, MODES)
  check_choice('strategy', run.strategy, STRATEGIES)
  _check_positive('cluster_start_timeout', run.cluster_start_timeout)
  check_choice('algorithm', run.algorithm, ALGORITHMS)
  check_choice('nonfinite', run.nonfinite, NONFINITE_POLICIES)
  _check_positive('nonfinite_skip_limit', run.nonfinite_skip_limit)
  if run.stop_check_steps < 0:
    raise ConfigError(f'stop_check_steps={run.stop_check_steps} must be >= 0 '
                      f'(0: check for a stop only between device loops).')
  if run.algorithm == 'pseudo_labels' and (mpl.mpl_weight or mpl.uda_weight):
    raise ConfigError(
        f'algorithm=pseudo_labels is the MPL step without feedback or UDA, '
        f'but mpl_weight={mpl.mpl_weight} and uda_weight={mpl.uda_weight}; '
        f'pass --mpl_weight=0 --uda_weight=0.')
  for name in ('steps_per_loop', 'checkpoint_every', 'keep_checkpoints',
               'eval_median_last'):
    _check_positive(name, getattr(run, name))
  for name in ('checkpoint_every', 'eval_every'):
    if getattr(run, name) % run.steps_per_loop:
      raise ConfigError(f'{name}={getattr(run, name)} must be a multiple of '
                        f'steps_per_loop={run.steps_per_loop} (checkpoints and '
                        f'evaluations happen between device loops).')
  finetune = config.finetune
  if finetune.steps < 0 or finetune.batch_size < 0:
    raise ConfigError('finetune_steps and finetune_batch_size must be >= 0.')
  if finetune.steps and finetune.learning_rate <= 0:
    raise ConfigError(f'finetune_learning_rate={finetune.learning_rate} must '
                      f'be positive when finetune_steps > 0.')
  return config
