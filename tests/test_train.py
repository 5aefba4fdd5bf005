"""End to end: flags -> config -> a few MPL and supervised steps -> results.

Uses scikit-learn's digits and a one-block-per-stage WRN so it runs in
seconds; the README's demo runs the same code at full size.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import tensorflow as tf
from absl import flags as absl_flags

from flags import definitions
from mpl_tf import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tempdir(test_case) -> str:
  path = tempfile.mkdtemp()
  test_case.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _config(model_dir, data_dir, *extra):
  flag_values = absl_flags.FlagValues()
  definitions.define(flag_values)
  flag_values(['test', '--flagfile=' + os.path.join(REPO, 'flags', 'demo.cfg'),
               '--dataset=digits', f'--data_dir={data_dir}',
               f'--model_dir={model_dir}', '--model=wrn-10-1',
               '--labeled_batch_size=4', '--uda_ratio=2', '--num_steps=3',
               '--supervised_steps=2', '--eval_every=2', '--log_every=1',
               '--num_validation=100', '--num_test=100',
               '--labeled_per_class=2', *extra])
  return definitions.to_config(flag_values)


class TrainEndToEndTest(tf.test.TestCase):

  def test_demo_preset_runs_and_reports(self):
    model_dir, data_dir = _tempdir(self), _tempdir(self)
    config = _config(model_dir, data_dir)
    results = train.run(config)
    for name in ('mpl_ema_student', 'mpl_student', 'mpl_teacher', 'supervised'):
      self.assertEqual(results[name]['test']['count'], 100)
      self.assertEqual(results[name]['validation']['count'], 100)
      self.assertBetween(results[name]['test']['top1'], 0.0, 1.0)
    self.assertLen(results['validation_history'], 1)
    with open(os.path.join(model_dir, 'config.json')) as f:
      self.assertEqual(json.load(f), config.to_dict())
    with open(os.path.join(model_dir, 'results.json')) as f:
      self.assertIn('supervised', json.load(f))
    self.assertTrue(tf.train.list_variables(
        os.path.join(model_dir, 'checkpoints', 'final')))


def _main(*args):
  return subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), *args],
                        capture_output=True, text=True, cwd=REPO, timeout=300)


class MainErrorsTest(tf.test.TestCase):

  def test_missing_data_is_one_clear_message(self):
    missing = os.path.join(_tempdir(self), 'nowhere')
    model_dir = _tempdir(self)
    result = _main('--dataset=cifar10', f'--data_dir={missing}',
                   f'--model_dir={model_dir}')
    self.assertEqual(result.returncode, 2, result.stderr)
    self.assertIn('error:', result.stderr)
    self.assertIn(missing, result.stderr)
    self.assertNotIn('Traceback', result.stderr)
    self.assertEqual(os.listdir(model_dir), [])   # nothing written

  def test_bad_choice_names_the_flag(self):
    result = _main('--pseudo_label=hard')
    self.assertNotEqual(result.returncode, 0)
    self.assertIn('pseudo_label', result.stderr)
    self.assertNotIn('Traceback', result.stderr)
