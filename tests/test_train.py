"""End to end: flags -> config -> MPL, finetuning, baseline -> results; resume.

Uses scikit-learn's digits and a one-block-per-stage WRN so it runs in
seconds; the README's demo runs the same code at full size.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf
from absl import flags as absl_flags

from flags import definitions
from mpl_tf import app
from mpl_tf import curves
from mpl_tf import preflight
from mpl_tf import train
from mpl_tf.config import ConfigError
from tests.testing import DataDirTestCase

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
               '--supervised_steps=2', '--eval_every=2', '--steps_per_loop=1',
               '--checkpoint_every=1', '--num_validation=100',
               '--num_test=100', '--labeled_per_class=2',
               '--finetune_steps=0', '--image_size=32', *extra])
  return definitions.to_config(flag_values)


def _variables(checkpoint_prefix, prefix):
  reader = tf.train.load_checkpoint(checkpoint_prefix)
  return {name: reader.get_tensor(name)
          for name, _ in tf.train.list_variables(checkpoint_prefix)
          if name.startswith(prefix) and 'OPTIMIZER_SLOT' not in name}


class TrainEndToEndTest(DataDirTestCase):

  def test_demo_preset_runs_finetunes_and_reports(self):
    model_dir = _tempdir(self)
    config = _config(model_dir, self.data_dir, '--finetune_steps=2')
    results = train.run(config)
    for name in ('mpl_ema_student', 'mpl_student', 'mpl_teacher',
                 'mpl_ema_student_finetuned', 'supervised'):
      self.assertEqual(results[name]['test']['count'], 100)
      self.assertEqual(results[name]['validation']['count'], 100)
      self.assertBetween(results[name]['test']['top1'], 0.0, 1.0)
    history = results['selected_history']
    self.assertEqual(history['final']['step'], 3)
    self.assertIn(history['best_on_validation']['step'], (2, 3))
    self.assertEqual(history['median_last']['k'], 2)
    with open(os.path.join(model_dir, 'config.json')) as f:
      self.assertEqual(json.load(f), config.to_dict())
    with open(os.path.join(model_dir, 'results.json')) as f:
      self.assertIn('supervised', json.load(f))
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, 'checkpoints'))
    self.assertTrue(latest.endswith('ckpt-3'))
    names = [name for name, _ in tf.train.list_variables(latest)]
    for key in ('teacher/', 'student/', 'ema_student/', 'teacher_optimizer/',
                'student_optimizer/', 'step/', 'h_baseline/',
                'random_states/'):
      self.assertTrue(any(n.startswith(key) for n in names), key)
    self.assertTrue(tf.train.latest_checkpoint(
        os.path.join(model_dir, 'checkpoints', 'best')))
    self.assertTrue(tf.io.gfile.glob(
        os.path.join(model_dir, 'logs', 'train', 'events.*')))
    # demo.cfg's eval_all_networks: every network's validation curve, at
    # eval_every (2) and at the end of each phase, drawn in curves.png.
    logs = lambda d: curves.read_scalars(os.path.join(model_dir, d))
    evaluated = logs('logs/eval')
    for tag in ('validation/top1', 'validation/top1_teacher',
                'validation/top1_student'):
      self.assertEqual([step for step, _ in evaluated[tag]], [2, 3], tag)
    self.assertAllClose(evaluated['validation/top1'][-1][1],
                        results['mpl_ema_student']['validation']['top1'])
    self.assertAllClose(evaluated['validation/top1_teacher'][-1][1],
                        results['mpl_teacher']['validation']['top1'])
    for phase in ('finetune', 'supervised'):
      self.assertEqual(
          [step for step, _ in logs(f'{phase}/logs/eval')['validation/top1']],
          [2], phase)
    self.assertIn('mpl/h', logs('logs/train'))
    with open(os.path.join(model_dir, 'curves.png'), 'rb') as f:
      self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')

    # The other modes on this run: export serves the finetuned student and
    # evaluating the export reproduces the loop's evaluation of it.
    exported = app.run(dataclasses.replace(
        config, run=dataclasses.replace(config.run, mode='export')))
    self.assertIn(os.path.join('finetune', 'checkpoints'),
                  exported['checkpoint'])
    evaluated = app.run(dataclasses.replace(config, run=dataclasses.replace(
        config.run, mode='eval', checkpoint=exported['export_dir'])))
    self.assertAllClose(evaluated['test']['top1'],
                        results['mpl_ema_student_finetuned']['test']['top1'])
    image_path = os.path.join(model_dir, 'digit.png')
    digit = np.zeros([32, 32, 3], np.uint8)
    digit[8:24, 14:18] = 255
    tf.io.write_file(image_path, tf.io.encode_png(digit))
    predicted = app.run(dataclasses.replace(config, run=dataclasses.replace(
        config.run, mode='predict', predict_files=image_path)))
    self.assertLen(predicted['predictions'], 1)
    self.assertBetween(predicted['predictions'][0]['class'], 0, 9)
    # --checkpoint names the export predict runs (docs/export.md's form),
    # not model_dir/export/1: moved elsewhere, the named one is used, and
    # a missing or non-export path is refused, naming it.
    moved = os.path.join(model_dir, 'served')
    os.rename(exported['export_dir'], moved)
    predict = lambda checkpoint: app.run(dataclasses.replace(
        config, run=dataclasses.replace(
            config.run, mode='predict', predict_files=image_path,
            checkpoint=checkpoint)))
    self.assertEqual(predict(moved), predicted)
    with self.assertRaisesRegex(FileNotFoundError,
                                f'No SavedModel in .*{model_dir}/nowhere'):
      predict(os.path.join(model_dir, 'nowhere'))
    with self.assertRaisesRegex(
        ConfigError, f'--checkpoint={model_dir} is a training checkpoint.*'
        f'--mode=export --checkpoint={model_dir}'):
      predict(model_dir)

  def test_resume_continues_at_the_checkpoint_with_every_network(self):
    # A 3-step run; then its last checkpoint is taken away, as if the run
    # had been killed after step 2, and the run is started again.
    # The kill came during the evaluation of step 2, after its checkpoint
    # was saved: eval_history.json holds no step 2 either.
    # The EMA starts at the released zeros and ones, and the teacher's
    # batch-norm statistics are frozen: a resume that started the EMA again
    # after restoring, or lost the frozen statistics, would differ.
    model_dir = _tempdir(self)
    config = _config(model_dir, self.data_dir, '--nosupervised_baseline',
                     '--eval_every=2', '--noeval_all_networks',
                     '--ema_init=released_code',
                     '--freeze_teacher_batch_norm_statistics')
    train.run(config)
    directory = os.path.join(model_dir, 'checkpoints')
    straight = _variables_of_every_network(tf.train.latest_checkpoint(
        directory))
    self.assertTrue(tf.train.latest_checkpoint(directory).endswith('ckpt-3'))
    for path in tf.io.gfile.glob(os.path.join(directory, 'ckpt-3*')):
      os.remove(path)
    tf.compat.v1.train.update_checkpoint_state(
        directory, os.path.join(directory, 'ckpt-2'),
        [os.path.join(directory, f'ckpt-{i}') for i in (1, 2)])
    history_path = os.path.join(model_dir, 'eval_history.json')
    with open(history_path) as f:
      evaluated = json.load(f)
    self.assertEqual([entry['step'] for entry in evaluated], [2, 3])
    with open(history_path, 'w') as f:
      json.dump([], f)

    with self.assertRaisesRegex(ConfigError, 'num_steps: 3 -> 4'):
      # The same model_dir with another configuration is refused.
      train.run(dataclasses.replace(
          config, optim=dataclasses.replace(config.optim, num_steps=4)))
    train.run(config)
    # The lost evaluation of step 2 ran again when the run resumed there.
    with open(history_path) as f:
      self.assertEqual([entry['step'] for entry in json.load(f)], [2, 3])
    resumed = _variables_of_every_network(tf.train.latest_checkpoint(
        directory))
    self.assertEqual(set(resumed), set(straight))
    for name, value in straight.items():
      self.assertAllClose(resumed[name], value, rtol=1e-5, atol=1e-6,
                          msg=name)

  def test_a_run_of_an_older_version_without_a_new_field_resumes(self):
    model_dir = _tempdir(self)
    config = _config(model_dir, self.data_dir)
    saved = config.to_dict()
    del saved['data']['input_sharding']   # the field came later
    with open(os.path.join(model_dir, 'config.json'), 'w') as f:
      json.dump(saved, f)
    preflight.check_model_dir(config)   # the default: the same run
    with self.assertRaisesRegex(ConfigError, "input_sharding: 'files' -> "
                                             "'global_batch'"):
      preflight.check_model_dir(_config(model_dir, self.data_dir,
                                    '--input_sharding=global_batch'))

  def test_uda_and_supervised_algorithms_train_and_report(self):
    for algorithm, networks in (('uda', {'uda_ema', 'uda'}),
                                ('supervised', {'supervised'})):
      model_dir = _tempdir(self)
      results = train.run(_config(
          model_dir, self.data_dir, f'--algorithm={algorithm}',
          '--num_steps=2', '--eval_every=0', '--nosupervised_baseline'))
      self.assertEqual(set(results) - {'selected_history', 'timings'},
                       networks)
      latest = tf.train.latest_checkpoint(os.path.join(model_dir,
                                                       'checkpoints'))
      self.assertTrue(latest.endswith('-2'))
      # The network export serves is in the checkpoint under its key
      # (checkpoints.DEFAULT_ITEM).
      self.assertNotEmpty(_variables(latest, 'ema_student/'))

  def test_pseudo_labels_is_mpl_without_feedback_or_uda(self):
    with self.assertRaisesRegex(ConfigError, '--mpl_weight=0 --uda_weight=0'):
      _config('unused', self.data_dir, '--algorithm=pseudo_labels')
    config = _config('unused', self.data_dir, '--algorithm=pseudo_labels',
                     '--mpl_weight=0', '--uda_weight=0')
    self.assertEqual(config.run.algorithm, 'pseudo_labels')


def _variables_of_every_network(checkpoint_prefix):
  values = {}
  for prefix in ('teacher/', 'student/', 'ema_student/', 'teacher_optimizer/',
                 'student_optimizer/', 'step/', 'h_baseline/',
                 'random_states/'):
    found = _variables(checkpoint_prefix, prefix)
    assert found, prefix
    values.update(found)
  return values


def _main(*args):
  return subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), *args],
                        capture_output=True, text=True, cwd=REPO, timeout=300)


class MainErrorsTest(tf.test.TestCase):

  def test_missing_data_is_one_clear_message(self):
    missing = os.path.join(_tempdir(self), 'nowhere')
    model_dir = _tempdir(self)
    result = _main('--dataset=cifar10_4k', f'--data_dir={missing}',
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


if __name__ == '__main__':
  tf.test.main()
