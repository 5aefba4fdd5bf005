"""The released preset's EMA start and teacher statistics, before and after.

Usage (from the repository root; a few minutes on one CPU core):
  .venv/bin/python benchmarks/released_preset_start.py [--json=PATH]

Runs flags/released_code_step.cfg for 3 steps on stand-in data (scikit-
learn's digits at 32 px, prepared on first use in a temporary directory;
WRN-28-1, B=4, mu=7, float32, one device, as the issue's side-by-side run),
once as before issue 26 (--ema_init=copy, teacher statistics moving) and
once as the preset now is (--ema_init=released_code,
--freeze_teacher_batch_norm_statistics), with a checkpoint after every step.
Each checkpoint is read back into freshly built networks, whose variables
are then chosen by object (models.batch_norm_statistics), and it prints:

  after steps 1 and 3: max |EMA - student| over every EMA variable, the
  means of the EMA's and of the student's batch-norm gamma, beta and moving
  variance, and max |EMA(released_code) - EMA(copy)| (the two runs'
  students are the same: neither choice changes a weight);
  over the 3 steps: the largest change of any teacher moving mean or
  variance from its start (0 and 1).

The preset's student waits 3,000 steps (rate 0): its weights do not move
here, its batch-norm moving statistics do (its training pass moves them).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top
import keras
import numpy as np
import tensorflow as tf
from absl import flags as absl_flags

from flags import definitions
from mpl_tf import train
from mpl_tf.models import batch_norm_statistics, build_model
# pylint: enable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(REPO, 'flags', 'released_code_step.cfg')
STAND_IN = ('--dataset=digits', '--crop=pad_crop', '--image_size=32',
            '--labeled_per_class=2', '--num_validation=100', '--num_test=100',
            '--model=wrn-28-1', '--labeled_batch_size=4', '--uda_ratio=7',
            '--dropout_rate=0', '--eval_batch_size=50', '--num_steps=3',
            '--steps_per_loop=1', '--checkpoint_every=1',
            '--keep_checkpoints=3', '--eval_every=0',
            '--nosupervised_baseline', '--finetune_steps=0',
            '--precision=float32', '--strategy=one_device')
RUNS = {'before (copy, moving)': ('--ema_init=copy',
                                  '--nofreeze_teacher_batch_norm_statistics'),
        'after (released_code, frozen)': ()}


def config_of(data_dir, model_dir, extra):
  flag_values = absl_flags.FlagValues()
  definitions.define(flag_values)
  flag_values(['measure', f'--flagfile={PRESET}', *STAND_IN,
               f'--data_dir={data_dir}', f'--model_dir={model_dir}', *extra])
  return definitions.to_config(flag_values)


def networks_at(config, prefix):
  """The teacher, student and EMA student of a checkpoint (None: as built)."""
  built = {name: build_model(config.model, 10, config.data.image_size, name)
           for name in ('teacher', 'student', 'ema_student')}
  if prefix is not None:
    tf.train.Checkpoint(**built).read(prefix).expect_partial()
  return built


def batch_norm_means(model):
  """Means of every batch-norm layer's gamma, beta and moving variance."""
  layers = [layer for layer in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
            if isinstance(layer, keras.layers.BatchNormalization)]
  return {name: float(np.concatenate(
      [getattr(layer, name).numpy() for layer in layers]).mean())
          for name in ('gamma', 'beta', 'moving_variance')}


def measure(config):
  directory = os.path.join(config.run.model_dir, 'checkpoints')
  start = networks_at(config, None)
  result = {}
  for step in (1, 3):
    nets = networks_at(config, os.path.join(directory, f'ckpt-{step}'))
    result[f'step_{step}'] = dict(
        max_abs_ema_minus_student=float(max(
            np.max(np.abs(e.numpy() - s.numpy())) for e, s in
            zip(nets['ema_student'].weights, nets['student'].weights))),
        ema_batch_norm_means=batch_norm_means(nets['ema_student']),
        student_batch_norm_means=batch_norm_means(nets['student']),
        ema=[v.numpy() for v in nets['ema_student'].weights])
  end = networks_at(config, os.path.join(directory, 'ckpt-3'))
  result['teacher_statistics_max_change'] = float(max(
      np.max(np.abs(a.numpy() - b.numpy())) for a, b in zip(
          batch_norm_statistics(end['teacher']),
          batch_norm_statistics(start['teacher']))))
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--json', default='', help='Also write the numbers.')
  args = parser.parse_args(argv)
  root = tempfile.mkdtemp()
  try:
    data_dir = os.path.join(root, 'digits')
    results = {}
    for name, extra in RUNS.items():
      config = config_of(data_dir, os.path.join(root, str(len(results))),
                         extra)
      train.run(config)
      results[name] = measure(config)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  before, after = results.values()
  print('\nflags/released_code_step.cfg, 3 steps on stand-in data:')
  for name, result in results.items():
    print(f'{name}:')
    for step in (1, 3):
      row = result[f'step_{step}']
      means = ', '.join(
          f'{key} {row["ema_batch_norm_means"][key]:.5g} / '
          f'{row["student_batch_norm_means"][key]:.5g}'
          for key in ('gamma', 'beta', 'moving_variance'))
      print(f'  after step {step}: max |EMA - student| '
            f'{row["max_abs_ema_minus_student"]:.4g}; mean batch-norm '
            f'EMA / student: {means}')
    print(f'  teacher BN moving statistics, max change over 3 steps: '
          f'{result["teacher_statistics_max_change"]:.4g}')
  gaps = {}
  for step in (1, 3):
    gaps[step] = float(max(np.max(np.abs(a - b)) for a, b in zip(
        after[f'step_{step}'].pop('ema'), before[f'step_{step}'].pop('ema'))))
    print(f'max |EMA(released_code) - EMA(copy)| after step {step}: '
          f'{gaps[step]:.4g}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(results, ema_gap=gaps), f, indent=2)


if __name__ == '__main__':
  main()
