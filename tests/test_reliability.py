"""What the run promises when things go wrong (docs/reliability.md).

Non-finite values: the step functions check their losses and gradient norms
on the device and either skip the whole step ('skip') or record it for the
loop to stop on ('stop'), which never saves a non-finite state. Bad input:
each mistake ends with one message naming the problem and the fix, before
anything is written to model_dir. Kills at random moments and exact resume
are recorded by benchmarks/kill_resume.py (too slow for a test).
"""

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf

from mpl_tf import app
from mpl_tf import optim
from mpl_tf import phase
from mpl_tf import train
from mpl_tf.config import ConfigError, MplConfig, OptimConfig
from mpl_tf.data import pipeline
from mpl_tf.data import records
from mpl_tf.mpl_step import MplStep
from mpl_tf.supervised_step import SupervisedStep
from mpl_tf.uda_step import UdaStep
from tests.test_train import REPO, _config, _tempdir
from tests.tiny_models import keras_mlp, random_batch
from tests.testing import DataDirTestCase

INPUT_DIM, HIDDEN, NUM_CLASSES, NUM_LABELED, NUM_UNLABELED = 4, 6, 3, 4, 6
MOMENTUM = OptimConfig(momentum=0.9, weight_decay=1e-3, ema_decay=0.5)
MPL_TERMS = ('teacher/supervised_loss', 'teacher/uda_loss',
             'student/pseudo_label_loss', 'student/grad_norm',
             'student/labeled_loss_new', 'mpl/h', 'teacher/grad_norm')


def _state(*objects):
  """Every float variable's value, by position (networks, slots, EMA)."""
  values = []
  for item in objects:
    variables = item.variables if hasattr(item, 'variables') else [item]
    values += [np.array(tf.convert_to_tensor(v)) for v in variables
               if tf.as_dtype(v.dtype).is_floating]
  return values


def _poisoned(batch, key, value=np.nan):
  images = batch[key].numpy().copy()
  images[0, 0] = value
  return {**batch, key: tf.constant(images)}


def _mpl_step(nonfinite):
  teacher = keras_mlp(INPUT_DIM, HIDDEN, NUM_CLASSES, 0, 'teacher')
  student = keras_mlp(INPUT_DIM, HIDDEN, NUM_CLASSES, 10, 'student')
  ema_student = keras_mlp(INPUT_DIM, HIDDEN, NUM_CLASSES, 10, 'ema_student')
  step = MplStep(
      MplConfig(baseline_decay=0.9), MOMENTUM, teacher, student,
      optim.make_optimizer(0.3, MOMENTUM, 'teacher_optimizer', teacher),
      optim.make_optimizer(0.4, MOMENTUM, 'student_optimizer', student),
      global_labeled_batch=NUM_LABELED, global_unlabeled_batch=NUM_UNLABELED,
      ema_student=ema_student, nonfinite=nonfinite)
  return step, (teacher, student, ema_student, step.teacher_optimizer,
                step.student_optimizer, step.baseline)


def _batch(seed):
  return random_batch(seed, NUM_LABELED, NUM_UNLABELED, INPUT_DIM,
                      NUM_CLASSES)


class NonFiniteStepTest(tf.test.TestCase):
  """The step functions alone: tiny float64 networks, eager and traced."""

  def _assert_skipped(self, step, state, counters, run, batch, term):
    before = _state(*state)
    counts_before = [int(c.numpy()) for c in counters]
    first = int(step.guard.first_step.numpy())
    step.guard.first_step.assign(-1)   # so describe() names this step
    metrics = run(batch)
    metrics = metrics[0] if isinstance(metrics, tuple) else metrics
    self.assertEqual(float(metrics['health/nonfinite']), 1.0)
    for old, new in zip(before, _state(*state)):
      self.assertAllEqual(old, new)   # weights, slots, EMA, baseline
    # Counters advance, so schedules and input streams stay on the step.
    self.assertEqual([int(c.numpy()) for c in counters],
                     [c + 1 for c in counts_before])
    self.assertIn(term, step.guard.describe())
    if first >= 0:
      step.guard.first_step.assign(first)

  def test_mpl_skip_undoes_the_whole_step_and_counts_it(self):
    step, state = _mpl_step('skip')
    counters = (step.step, step.teacher_optimizer.iterations,
                step.student_optimizer.iterations)
    for run in (step, tf.function(step)):
      run(_batch(0))   # a finite step first: slots and EMA are non-trivial
      # NaN in an unlabeled image: the teacher's UDA loss is the first term.
      self._assert_skipped(step, state, counters, run,
                           _poisoned(_batch(1), 'unlabeled_images_aug'),
                           'teacher/uda_loss')
      # Inf in a labeled image: tanh saturates, so every loss stays finite,
      # but the gradients (inf * 0) are NaN: caught by the global norms.
      self._assert_skipped(step, state, counters, run,
                           _poisoned(_batch(2), 'labeled_images', np.inf),
                           'student/grad_norm')
      before = _state(*state)
      metrics, _ = run(_batch(3))   # and training goes on
      self.assertEqual(float(metrics['health/nonfinite']), 0.0)
      self.assertNotAllClose(before[0], _state(*state)[0])
    self.assertEqual(int(step.guard.skipped_steps.numpy()), 4)
    # The first non-finite step is kept (1-based: the second step).
    self.assertStartsWith(step.guard.describe(), 'step 2 (')

  def test_mpl_stop_records_the_step_and_every_non_finite_term(self):
    step, _ = _mpl_step('stop')
    step(_batch(0))
    self.assertIsNone(step.guard.describe())
    step(_poisoned(_batch(1), 'labeled_images'))
    description = step.guard.describe()
    self.assertStartsWith(description, 'step 2 (')
    for term in ('teacher/supervised_loss', 'teacher/grad_norm'):
      self.assertIn(term, description)
    self.assertEqual(int(step.guard.skipped_steps.numpy()), 1)

  def test_uda_and_supervised_steps_skip_too(self):
    model = keras_mlp(INPUT_DIM, HIDDEN, NUM_CLASSES, 0, 'uda')
    ema_model = keras_mlp(INPUT_DIM, HIDDEN, NUM_CLASSES, 0, 'uda_ema')
    uda = UdaStep(MplConfig(), MOMENTUM, model,
                  optim.make_optimizer(0.3, MOMENTUM, 'optimizer', model),
                  global_labeled_batch=NUM_LABELED,
                  global_unlabeled_batch=NUM_UNLABELED, ema_model=ema_model,
                  nonfinite='skip')
    uda(_batch(0))
    self._assert_skipped(uda, (model, ema_model, uda.optimizer),
                         (uda.step, uda.optimizer.iterations), uda,
                         _poisoned(_batch(1), 'unlabeled_images_ori'),
                         'uda/consistency_loss')
    model = keras_mlp(INPUT_DIM, HIDDEN, NUM_CLASSES, 0, 'supervised')
    optimizer = optim.make_optimizer(0.3, MOMENTUM, 'optimizer', model)
    supervised = SupervisedStep(model, optimizer, MOMENTUM, 0.0, NUM_LABELED,
                                nonfinite='skip')
    supervised(_batch(0))
    self._assert_skipped(supervised, (model, optimizer),
                         (optimizer.iterations,), supervised,
                         _poisoned(_batch(1), 'labeled_images'),
                         'supervised/loss')


def _poison_train_stream(test_case, poisoned_step):
  """Makes the training batch of `poisoned_step` (0-based) hold a NaN."""
  original = pipeline.train_dataset
  test_case._clean_train_dataset = original  # pylint: disable=protected-access

  def train_dataset(config, manifest, context, start_step=0):
    dataset = original(config, manifest, context, start_step)

    def poison(index, batch):
      images = batch['labeled_images']
      bad = tf.equal(index + start_step, poisoned_step)
      batch = dict(batch)
      batch['labeled_images'] = tf.where(
          bad, tf.fill(tf.shape(images), np.nan), images)
      return batch
    return dataset.enumerate().map(poison)

  pipeline.train_dataset = train_dataset
  test_case.addCleanup(setattr, pipeline, 'train_dataset', original)


class NonFiniteLoopTest(DataDirTestCase):
  """The loop's side: stop never saves a NaN; skip counts and goes on."""

  def _config(self, model_dir, *extra):
    return _config(model_dir, self.data_dir, '--nosupervised_baseline',
                   '--eval_every=0', '--num_steps=4', *extra)

  def test_stop_keeps_the_last_finite_checkpoint_and_skip_goes_on(self):
    # One model_dir for both policies, as the stop message advises: the
    # NaN batch of step 3 stops the run (ckpt-2 kept, finite, no ckpt-3);
    # the same command with --nonfinite=skip then resumes from ckpt-2, skips
    # step 3 (its batch is the same NaN one: streams are functions of the
    # step), counts it in the checkpoint and finishes.
    model_dir = _tempdir(self)
    _poison_train_stream(self, poisoned_step=2)
    with self.assertRaisesRegex(
        phase.NonFiniteError,
        r'mpl: non-finite value \(NaN or Inf\) at step 3 \(teacher/'
        r'supervised_loss.*\).*the last checkpoint is .*ckpt-2.*'
        r'--nonfinite=skip'):
      train.run(self._config(model_dir))
    latest = tf.train.latest_checkpoint(os.path.join(model_dir,
                                                     'checkpoints'))
    self.assertTrue(latest.endswith('ckpt-2'), latest)
    self.assertEmpty(glob.glob(os.path.join(model_dir, 'checkpoints',
                                            'ckpt-3*')))
    reader = tf.train.load_checkpoint(latest)
    for name, _ in tf.train.list_variables(latest):
      value = reader.get_tensor(name)
      if np.issubdtype(np.asarray(value).dtype, np.floating):
        self.assertTrue(np.all(np.isfinite(value)), name)

    train.run(self._config(model_dir, '--nonfinite=skip'))
    latest = tf.train.latest_checkpoint(os.path.join(model_dir,
                                                     'checkpoints'))
    self.assertTrue(latest.endswith('ckpt-4'), latest)
    reader = tf.train.load_checkpoint(latest)
    names = dict(tf.train.list_variables(latest))
    skipped = [n for n in names if n.startswith('health/skipped_steps')]
    self.assertLen(skipped, 1)
    self.assertEqual(reader.get_tensor(skipped[0]), 1)
    self.assertEqual(reader.get_tensor('step/.ATTRIBUTES/VARIABLE_VALUE'), 4)
    events = glob.glob(os.path.join(model_dir, 'logs', 'train', 'events.*'))
    tags = {value.tag for path in events
            for event in tf.compat.v1.train.summary_iterator(path)
            for value in event.summary.value}
    self.assertIn('health/skipped_steps', tags)

  def test_stop_before_a_checkpoint_says_what_to_do_with_model_dir(self):
    # NaN in the first step: no checkpoint exists when the run stops.
    model_dir = _tempdir(self)
    _poison_train_stream(self, poisoned_step=0)
    with self.assertRaises(phase.NonFiniteError) as stopped:
      train.run(self._config(model_dir))
    message = str(stopped.exception)
    self.assertIn('there is no checkpoint yet', message)
    self.assertIn(f'rm -r {model_dir}', message)
    self.assertIn('--nonfinite=skip to start again', message)
    # Why: the lower rates the message suggests are refused in that
    # model_dir (it holds the attempt's config.json) ...
    with self.assertRaisesRegex(ConfigError, 'different configuration'):
      train.run(self._config(model_dir, '--teacher_lr=0.01'))
    # ... and run once it is deleted, as the message says.
    pipeline.train_dataset = self._clean_train_dataset
    shutil.rmtree(model_dir)
    train.run(self._config(model_dir, '--teacher_lr=0.01', '--num_steps=1'))
    self.assertTrue(tf.train.latest_checkpoint(
        os.path.join(model_dir, 'checkpoints')).endswith('ckpt-1'))

  def test_skip_stops_when_the_state_itself_makes_every_step_non_finite(self):
    # The explanation of "0.0000 top-1 after --nonfinite=skip": a teacher
    # rate of 1e30 makes the first update finite but enormous; from those
    # weights every forward pass overflows, so every later step is skipped
    # and restored to the same broken state. Skip mode used to finish such
    # a run; it now stops after nonfinite_skip_limit steps in a row.
    model_dir = _tempdir(self)
    config = self._config(model_dir, '--nonfinite=skip', '--teacher_lr=1e30',
                          '--teacher_warmup_steps=0', '--num_steps=6',
                          '--nonfinite_skip_limit=3')
    with self.assertRaisesRegex(
        phase.NonFiniteError,
        r'mpl: the last 3 steps \(up to step 4\) were all non-finite and '
        r'skipped.*state they start from is itself broken.*rm -r|another '
        r'--model_dir'):
      train.run(config)
    # The state it saved is finite, which is why the save check let it
    # through, but the teacher's weights are enormous: the broken state.
    latest = tf.train.latest_checkpoint(os.path.join(model_dir,
                                                     'checkpoints'))
    reader = tf.train.load_checkpoint(latest)
    largest = 0.0
    for name, _ in tf.train.list_variables(latest):
      value = np.asarray(reader.get_tensor(name))
      if np.issubdtype(value.dtype, np.floating):
        self.assertTrue(np.all(np.isfinite(value)), name)
        # (the teacher's weights may be saved under its optimizer's path)
        if name.startswith('teacher') and value.size:
          largest = max(largest, float(np.abs(value).max()))
    self.assertGreater(largest, 1e20)
    self.assertTrue(latest.endswith('ckpt-3'), latest)

    # The same command again resumes from ckpt-3, whose count of steps
    # skipped in a row (2) is in the checkpoint: it stops at step 4 again
    # (counting afresh, it would skip steps 4-6 and stop only at step 6,
    # or finish a shorter run with the broken teacher).
    with self.assertRaisesRegex(phase.NonFiniteError,
                                r'the last 3 steps \(up to step 4\)'):
      train.run(config)
    # A lower limit, which a resume may change, stops before any step.
    lower = dataclasses.replace(config, run=dataclasses.replace(
        config.run, nonfinite_skip_limit=2))
    with self.assertRaisesRegex(phase.NonFiniteError,
                                r'the last 2 steps \(up to step 3\)'):
      train.run(lower)
    self.assertTrue(tf.train.latest_checkpoint(os.path.join(
        model_dir, 'checkpoints')).endswith('ckpt-3'))
    # A limit above the steps left lets the run skip to its end; then the
    # broken teacher's evaluation (NaN logits, which in_top_k counts as
    # misses: top-1 0.0000) fails the run instead of being reported as a
    # result with exit status 0.
    higher = dataclasses.replace(config, run=dataclasses.replace(
        config.run, nonfinite_skip_limit=20))
    with self.assertRaisesRegex(
        phase.NonFiniteError, r'non-finite outputs \(NaN or Inf logits\) '
        r'from mpl_teacher \(100 of 100 validation images, 100 of 100 test '
        r'images\).*weights are broken'):
      train.run(higher)
    with open(os.path.join(model_dir, 'results.json')) as f:
      saved = json.load(f)
    self.assertEqual(saved['mpl_teacher']['test']['nonfinite'], 100)
    self.assertEqual(saved['mpl_student']['test']['nonfinite'], 0)


def _rewrite_record(data_dir, split, index, serialized=None, corrupt=False):
  """Replaces (or corrupts the bytes of) one record of a split's first shard."""
  path = records.split_files(data_dir, split)[0]
  if corrupt:
    with open(path, 'r+b') as f:
      f.seek(os.path.getsize(path) // 2)
      f.write(b'\xff' * 16)
    return path
  existing = [r.numpy() for r in tf.data.TFRecordDataset(path)]
  existing[index] = serialized
  with tf.io.TFRecordWriter(path) as writer:
    for record in existing:
      writer.write(record)
  return path


class BadInputTest(tf.test.TestCase):
  """Each user error: one message naming problem and fix; model_dir empty."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = tempfile.mkdtemp()
    # Prepares the digits data once; each case damages a copy of it.
    _config('unused', cls.data_dir)
    from mpl_tf.data import offline  # pylint: disable=g-import-not-at-top
    offline.ensure_prepared(_config('unused', cls.data_dir).data)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.data_dir, ignore_errors=True)
    super().tearDownClass()

  def _damaged_data(self):
    copy = os.path.join(_tempdir(self), 'data')
    shutil.copytree(self.data_dir, copy)
    return copy

  def _assert_refused(self, error, pattern, data_dir=None, *flags):
    parent = _tempdir(self)
    model_dir = os.path.join(parent, 'run')
    config = _config(model_dir, data_dir or self.data_dir,
                     '--nosupervised_baseline', *flags)
    with self.assertRaisesRegex(error, pattern):
      train.run(config)
    self.assertFalse(os.path.exists(model_dir), 'model_dir was written')

  def test_data_problems_are_named_before_model_dir_is_written(self):
    image = np.zeros([32, 32, 3], np.uint8)
    cases = {
        'corrupt TFRecord': (dict(corrupt=True), 'corrupt|unreadable'),
        'wrong size': (dict(serialized=records.serialize_example(
            np.zeros([16, 16, 3], np.uint8), 1)), '16x16 image, expected 32x32'),
        'wrong channels': (dict(serialized=records.serialize_example(
            np.zeros([32, 32, 1], np.uint8), 1)), '1 channels, expected 3'),
        'label out of range': (dict(serialized=records.serialize_example(
            image, 10)), r'label 10, outside \[0, 10\)'),
    }
    for name, (damage, pattern) in cases.items():
      with self.subTest(name):
        data_dir = self._damaged_data()
        path = _rewrite_record(data_dir, 'labeled', 0, **damage)
        self._assert_refused(ValueError, f'{path}.*({pattern}).*prepare',
                             data_dir)

  def test_corrupt_manifest_names_the_file_and_the_fix(self):
    data_dir = self._damaged_data()
    path = os.path.join(data_dir, records.MANIFEST_NAME)
    with open(path) as f:
      text = f.read()
    with open(path, 'w') as f:
      f.write(text[:len(text) // 2])   # a write cut off midway
    self._assert_refused(ValueError, f'{path}.*not valid JSON.*prepare',
                         data_dir)

  def test_data_without_validation_or_test_images_is_refused(self):
    for split, flag in (('validation', '--validation_per_class=N'),
                        ('test', '--num_test=N')):
      with self.subTest(split):
        data_dir = self._damaged_data()
        manifest = records.read_manifest(data_dir)
        manifest['counts'][split] = 0
        with open(os.path.join(data_dir, records.MANIFEST_NAME), 'w') as f:
          json.dump(manifest, f)
        self._assert_refused(ValueError, f'no {split} images.*{flag}',
                             data_dir)

  def test_data_dir_under_a_file_is_named(self):
    a_file = os.path.join(_tempdir(self), 'a_file')
    with open(a_file, 'w') as f:
      f.write('not a directory')
    self._assert_refused(ConfigError, f'data_dir .*{a_file}.* is a file.*'
                         f'--data_dir', os.path.join(a_file, 'data'))

  def test_non_finite_numbers_are_refused_by_name(self):
    for flag in ('--teacher_lr=nan', '--student_lr=inf', '--uda_weight=nan',
                 '--ema_decay=nan', '--weight_decay=inf'):
      with self.subTest(flag):
        name = flag[2:].split('=')[0]
        # Refused when the flags are read, before any run starts.
        with self.assertRaisesRegex(ConfigError,
                                    f'^{name}=(nan|inf) must be .*finite'):
          _config(os.path.join(_tempdir(self), 'run'), self.data_dir, flag)

  def test_missing_split_and_class_without_labels(self):
    data_dir = self._damaged_data()
    for path in records.split_files(data_dir, 'validation'):
      os.remove(path)
    self._assert_refused(FileNotFoundError, 'validation', data_dir)
    # Every labeled example of class 3 relabeled as 4: class 3 has none.
    data_dir = self._damaged_data()
    path = records.split_files(data_dir, 'labeled')[0]
    relabeled = []
    for serialized in tf.data.TFRecordDataset(path):
      encoded, label = records.parse_encoded(serialized)
      label = 4 if int(label) == 3 else int(label)
      relabeled.append(records.serialize_encoded(encoded.numpy(), label))
    with tf.io.TFRecordWriter(path) as writer:
      for record in relabeled:
        writer.write(record)
    # Start-up reads the labeled class counts from the manifest (a whole
    # split read at every start would cost minutes on ImageNet), and counts
    # the records only when the manifest has none: both must refuse.
    manifest = records.read_manifest(data_dir)
    counts = manifest['class_counts']['labeled']
    counts[4], counts[3] = counts[4] + counts[3], 0
    records.write_manifest(data_dir, manifest)
    self._assert_refused(ValueError, 'no example of class.*3.*labeled',
                         data_dir)
    del manifest['class_counts']
    records.write_manifest(data_dir, manifest)
    self._assert_refused(ValueError, 'no example of class.*3.*labeled',
                         data_dir)

  def test_more_labels_than_exist(self):
    data_dir = os.path.join(_tempdir(self), 'data')
    self._assert_refused(ValueError, 'labeled_per_class|labeled', data_dir,
                         '--labeled_per_class=1000')

  def test_batch_not_divisible_by_replicas(self):
    self._assert_refused(ConfigError, 'labeled_batch_size=3.*2 replicas|'
                         'labeled_batch_size.*divis', None,
                         '--strategy=mirrored', '--labeled_batch_size=3')

  def test_unwritable_model_dir(self):
    blocker = os.path.join(_tempdir(self), 'a_file')
    with open(blocker, 'w') as f:
      f.write('not a directory')
    config = _config(os.path.join(blocker, 'run'), self.data_dir)
    with self.assertRaisesRegex(ConfigError, 'is a file.*--model_dir'):
      train.run(config)
    # A place no one may write, even root (procfs): found at the first write.
    config = _config('/proc/mpl_tf_run', self.data_dir,
                     '--nosupervised_baseline')
    with self.assertRaisesRegex(ConfigError, 'not writable.*--model_dir'):
      train.run(config)

  def test_export_and_eval_of_a_missing_checkpoint(self):
    model_dir = _tempdir(self)
    config = _config(model_dir, self.data_dir)
    for mode in ('export', 'eval'):
      with self.subTest(mode):
        with self.assertRaisesRegex(FileNotFoundError, 'checkpoint'):
          app.run(dataclasses.replace(config, run=dataclasses.replace(
              config.run, mode=mode)))
        self.assertEqual(os.listdir(model_dir), [])


def _main(*args):
  return subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), *args],
                        capture_output=True, text=True, cwd=REPO, timeout=300)


class MainExitStatusTest(tf.test.TestCase):
  """main.py: status 2, one 'error:' line, no traceback (a few subprocesses)."""

  def _assert_user_error(self, result, *fragments):
    self.assertEqual(result.returncode, 2, result.stderr)
    self.assertNotIn('Traceback', result.stderr)
    lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
    self.assertLen(lines, 1, result.stderr)
    for fragment in fragments:
      self.assertIn(fragment, lines[0])

  def test_unknown_and_contradicting_flags(self):
    self._assert_user_error(_main('--learning_rate=0.1'),
                            "Unknown command line flag 'learning_rate'",
                            '--helpfull')
    self._assert_user_error(_main('--algorithm=pseudo_labels'),
                            '--mpl_weight=0 --uda_weight=0')

  def test_non_finite_stop_is_status_2_naming_step_and_term(self):
    # A teacher rate of 1e30 makes the teacher's weights overflow at once.
    data_dir, model_dir = _tempdir(self), _tempdir(self)
    result = _main('--flagfile=' + os.path.join(REPO, 'flags', 'demo.cfg'),
                   '--dataset=digits', f'--data_dir={data_dir}',
                   f'--model_dir={model_dir}', '--model=wrn-10-1',
                   '--labeled_batch_size=4', '--uda_ratio=2', '--num_steps=4',
                   '--steps_per_loop=1', '--checkpoint_every=1',
                   '--teacher_lr=1e30', '--nosupervised_baseline',
                   '--num_validation=100', '--num_test=100',
                   '--labeled_per_class=2')
    self._assert_user_error(result, 'non-finite value', 'at step',
                            'teacher/', '--nonfinite=skip')


if __name__ == '__main__':
  tf.test.main()


class InterruptedCheckpointWriteTest(tf.test.TestCase):

  def test_restart_removes_the_temporary_shards_of_a_killed_write(self):
    # What a SIGKILL inside tf.train.Checkpoint.write leaves (recorded by
    # benchmarks/kill_resume.py): <prefix>_temp/ with partial shards, which
    # no state file names. A real checkpoint beside it must stay readable.
    directory = self.get_temp_dir()
    variable = tf.Variable([1.0, 2.0])
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(v=variable), directory, max_to_keep=2)
    saved = manager.save()
    torn = os.path.join(directory, 'ckpt-2_temp')
    os.makedirs(torn)
    with open(os.path.join(torn, 'part-00000-of-00001.data-00000-of-00001'),
              'wb') as f:
      f.write(b'\x00' * 7)
    self.assertEqual(phase.remove_interrupted_writes(directory), [torn])
    self.assertFalse(os.path.exists(torn))
    self.assertEqual(tf.train.latest_checkpoint(directory), saved)
    self.assertEqual(phase.remove_interrupted_writes(directory), [])
