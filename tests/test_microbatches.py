"""--microbatches=K: K chunks of each replica's batch in turn, one update.

K chunks on one device must train exactly like K replicas under
MirroredStrategy (non-synchronized batch norm), each holding one chunk:
the same teacher, student and EMA student, h and its baseline, optimizer
slots, seed states, and batch-norm moving statistics equal to the mean of
the K replicas' own copies (Keras 3 keeps one copy per replica; see
mpl_tf/microbatches.py). Dropout is on throughout: chunk k of replica r
draws the masks of replica r*K+k, so the masks are compared too, through
every weight they touch. K=1 is the step as it was, bitwise.

The networks are tiny float64 MLPs with batch norm and dropout
(tests/test_mpl_step.py); references with 4 replicas run in a child
process with 4 logical CPUs, since one process holds one strategy.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl import flags as absl_flags

from flags import definitions
from mpl_tf import distribute
from mpl_tf import optim
from mpl_tf import train
from mpl_tf.config import ConfigError, OptimConfig, RunConfig
from mpl_tf.models import (batch_norm_statistics, random_states,
                           replica_distinct_randomness)
from mpl_tf.mpl_step import MplStep
from mpl_tf.supervised_step import SupervisedStep
from mpl_tf.uda_step import UdaStep
from tests.test_mpl_step import (INPUT_DIM, NUM_CLASSES, STEP_BEFORE,
                                 STUDENT_LR, TEACHER_LR,
                                 _mlp_with_batch_norm_and_dropout,
                                 mpl_config)
from tests.testing import DataDirTestCase
from tests.tiny_models import random_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELED, UNLABELED = 8, 16        # global batches: K=4 chunks of 2 and 4
STEPS = 3
OPTIM = OptimConfig(momentum=0.9, weight_decay=1e-3, ema_decay=0.9)


def build_mpl(fields: dict):
  """An MPL step of BN + dropout MLPs (in the current strategy's scope);
  (step, what it changes by name, the networks that draw masks)."""
  teacher = _mlp_with_batch_norm_and_dropout(0, 'teacher')
  student = _mlp_with_batch_norm_and_dropout(10, 'student')
  ema_student = _mlp_with_batch_norm_and_dropout(10, 'ema_student')
  step = MplStep(
      mpl_config(**fields), OPTIM, teacher, student,
      optim.make_optimizer(TEACHER_LR, OPTIM, 'teacher_optimizer', teacher),
      optim.make_optimizer(STUDENT_LR, OPTIM, 'student_optimizer', student),
      global_labeled_batch=LABELED, global_unlabeled_batch=UNLABELED,
      ema_student=ema_student, seed=3)
  step.step.assign(STEP_BEFORE)
  items = dict(teacher=teacher, student=student, ema_student=ema_student,
               teacher_optimizer=step.teacher_optimizer,
               student_optimizer=step.student_optimizer,
               h_baseline=step.baseline, step=step.step)
  return step, items, (teacher, student, ema_student)


def build_uda(fields: dict):
  model = _mlp_with_batch_norm_and_dropout(0, 'uda')
  ema_model = _mlp_with_batch_norm_and_dropout(0, 'uda_ema')
  optimizer = optim.make_optimizer(TEACHER_LR, OPTIM, 'optimizer', model)
  step = UdaStep(mpl_config(**fields), OPTIM, model, optimizer,
                 global_labeled_batch=LABELED,
                 global_unlabeled_batch=UNLABELED, ema_model=ema_model)
  step.step.assign(STEP_BEFORE)
  return step, dict(model=model, ema_model=ema_model, optimizer=optimizer,
                    step=step.step), (model, ema_model)


def build_supervised(fields: dict):
  """SupervisedStep as finetuning makes it (train._finetune): a cosine
  schedule and its own weight decay."""
  model = _mlp_with_batch_norm_and_dropout(0, 'finetuned')
  decay = OptimConfig(momentum=0.9, weight_decay=2e-3)
  optimizer = optim.make_optimizer(optim.WarmupCosine(0.3, 10), decay,
                                   'finetune_optimizer', model)
  step = SupervisedStep(model, optimizer, decay, 0.1, LABELED,
                        microbatches=fields.get('microbatches', 1))
  return step, dict(model=model, optimizer=optimizer), (model,)


def _batches():
  return [random_batch(seed, LABELED, UNLABELED, INPUT_DIM, NUM_CLASSES)
          for seed in range(STEPS)]


def _replica_share(batch, index: int, replicas: int):
  return {key: tf.split(value, replicas)[index]
          for key, value in batch.items()}


def _local_values(strategy, variable):
  """Each replica's copy of a variable (one, outside any strategy)."""
  if strategy is None:
    return [np.asarray(variable.numpy())]
  value = variable.value if isinstance(variable, keras.Variable) else variable
  return [np.asarray(v) for v in strategy.experimental_local_results(value)]


def state_of(items: dict, strategy=None) -> dict:
  """What a step changes, by name and position; batch-norm statistics as
  the mean of the replicas' copies (Keras 3 updates each replica's own)."""
  state = {}
  for name, item in items.items():
    statistics = ({id(v) for v in batch_norm_statistics(item)}
                  if isinstance(item, keras.Model) else set())
    variables = (item.variables if isinstance(
        item, (keras.Model, keras.optimizers.Optimizer)) else [item])
    for index, variable in enumerate(variables):
      copies = _local_values(strategy, variable)
      # By position: Keras's layer names depend on what the process built.
      state[f'{name}/{index}'] = (np.mean(copies, axis=0)
                                  if id(variable) in statistics else copies[0])
  return state


def run_steps(build, fields: dict, strategy=None):
  """STEPS steps of build(fields)'s step on one device or on the strategy's
  replicas (each holding consecutive rows, masks drawn per replica as
  phase.py draws them); (state, per-step metrics)."""
  if strategy is None:
    step, items, _ = build(fields)
    run = tf.function(step)
  else:
    with strategy.scope():
      step, items, networks = build(fields)
    replica_step = replica_distinct_randomness(step, random_states(*networks))
    run = tf.function(lambda b: strategy.run(replica_step, args=(b,)))
  metrics = []
  for batch in _batches():
    if strategy is not None:
      replicas = strategy.num_replicas_in_sync
      batch = strategy.experimental_distribute_values_from_function(
          lambda context, b=batch: _replica_share(
              b, context.replica_id_in_sync_group, replicas))
    results = run(batch)
    step_metrics, outputs = results if isinstance(results, tuple) else (
        results, {})
    local = lambda value: (
        [np.asarray(value)] if strategy is None else
        [np.asarray(v) for v in strategy.experimental_local_results(value)])
    # The mean over replicas: the same for global values, the replica
    # batch's fraction for local ones (mask rates).
    row = {key: float(np.mean(local(value)))
           for key, value in step_metrics.items()}
    if 'pseudo_label_ids' in outputs:
      row['pseudo_label_ids'] = np.concatenate(
          local(outputs['pseudo_label_ids'])).tolist()
    metrics.append(row)
  return state_of(items, strategy), metrics


def run_mpl(fields: dict, strategy=None):
  return run_steps(build_mpl, fields, strategy)


def digest(state: dict, metrics: list) -> str:
  """SHA-256 of every state array's bytes and every metric, in name order."""
  sha = hashlib.sha256()
  for name in sorted(state):
    sha.update(name.encode())
    sha.update(np.ascontiguousarray(state[name]).tobytes())
  sha.update(json.dumps(metrics, sort_keys=True).encode())
  return sha.hexdigest()


# The K=1 scenarios and their digests as the step computed them before
# microbatches existed: `python -m tests.test_microbatches k1_reference` in
# a checkout of commit 1d987f4 with this file copied into its tests/ (with
# TF_ENABLE_ONEDNN_OPTS=0, as the suite runs). float64 on this machine's
# kind of CPU; another CPU's kernels could round otherwise.
K1_SCENARIOS = {
    'exact_paper_baseline': dict(feedback='exact', feedback_sign='paper',
                                 baseline_decay=0.5),
    'taylor_released_no_grad_remat': dict(
        feedback='taylor', feedback_sign='released_code',
        teacher_original_pass='no_grad', rematerialize_teacher=True),
}
K1_DIGESTS = {
    'exact_paper_baseline':
        'f6c1351db4e0499718d95203e30a6a4dc6db5e08b30e99c186466ba0e55caccf',
    'taylor_released_no_grad_remat':
        '15470450f7776a90e75e27c189e755b499a73baf99967d2c110827af8435e9a3',
}
# The 4-replica reference (a child process) and what is compared with it.
FOUR_REPLICA_FIELDS = dict(feedback='exact', feedback_sign='paper',
                           baseline_decay=0.5)


def _k1_reference() -> dict:
  return {name: digest(*run_mpl(fields))
          for name, fields in K1_SCENARIOS.items()}


def _four_replica_reference(path: str) -> None:
  """Runs FOUR_REPLICA_FIELDS on 4 replicas; saves state and metrics."""
  strategy = distribute.get_strategy(RunConfig(strategy='mirrored'))
  assert strategy.num_replicas_in_sync == 4, strategy.num_replicas_in_sync
  state, metrics = run_mpl(FOUR_REPLICA_FIELDS, strategy)
  np.savez(path, metrics=json.dumps(metrics), **state)


class _Comparisons(tf.test.TestCase):

  def assert_same_training(self, state, metrics, expected_state,
                           expected_metrics, what: str):
    """Every variable to the two-replica tests' float64 tolerance; the
    logged float32 metrics to float32 rounding; the pseudo labels exactly."""
    self.assertEqual(set(state), set(expected_state), what)
    for name, value in expected_state.items():
      self.assertAllClose(state[name], value, rtol=1e-9, atol=1e-12,
                          msg=f'{what}: {name}')
    for row, expected in zip(metrics, expected_metrics, strict=True):
      self.assertEqual(set(row), set(expected))
      for key, value in expected.items():
        if key == 'pseudo_label_ids':
          self.assertAllEqual(row[key], value, msg=f'{what}: {key}')
        else:
          self.assertAllClose(row[key], value, rtol=1e-6, atol=1e-7,
                              msg=f'{what}: {key}')


class MplMicrobatchesTest(_Comparisons):
  """The MPL step: K chunks on one device equal K replicas."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.strategy = distribute.get_strategy(RunConfig(strategy='mirrored'))
    # The 4-replica reference, in a process of its own (one strategy per
    # process), while the tests below run.
    cls.four_replicas = os.path.join(tempfile.mkdtemp(), 'four.npz')
    cls.child = subprocess.Popen(
        [sys.executable, '-m', 'tests.test_microbatches', 'four_replicas',
         cls.four_replicas], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)

  @classmethod
  def tearDownClass(cls):
    cls.child.kill()
    cls.child.communicate()
    shutil.rmtree(os.path.dirname(cls.four_replicas), ignore_errors=True)
    super().tearDownClass()

  def test_two_chunks_train_like_two_replicas(self):
    self.assertEqual(self.strategy.num_replicas_in_sync, 2)
    # Both feedbacks, both signs; the baseline, the original view's own
    # pass and the other student view on the way.
    for fields in (
        dict(feedback='exact', feedback_sign='paper', baseline_decay=0.5),
        dict(feedback='taylor', feedback_sign='released_code',
             baseline_decay=0.5, teacher_original_pass='no_grad')):
      what = str(fields)
      expected_state, expected_metrics = run_mpl(fields, self.strategy)
      state, metrics = run_mpl(dict(fields, microbatches=2))
      self.assert_same_training(state, metrics, expected_state,
                                expected_metrics, what)
      self.assertGreater(min(abs(m['mpl/h']) for m in metrics), 1e-4, what)
    # Not vacuous: the chunks' own batch norm and masks train otherwise
    # than one device on the whole batch.
    whole, _ = run_mpl(fields)
    self.assertNotAllClose(whole['student/0'], state['student/0'])

  def test_k1_is_the_step_before_microbatches_bitwise(self):
    for name, fields in K1_SCENARIOS.items():
      self.assertEqual(digest(*run_mpl(dict(fields, microbatches=1))),
                       K1_DIGESTS[name], name)

  def test_two_replicas_of_two_chunks_train_like_four_replicas(self):
    """K=4 on one device, and K=2 on each of 2 replicas, equal 4 replicas:
    chunk k of replica r draws the masks and rows of replica 2r+k."""
    on_one_device = run_mpl(dict(FOUR_REPLICA_FIELDS, microbatches=4))
    on_two_replicas = run_mpl(dict(FOUR_REPLICA_FIELDS, microbatches=2),
                              self.strategy)
    output, _ = self.child.communicate(timeout=300)
    self.assertEqual(self.child.returncode, 0, output[-3000:])
    with np.load(self.four_replicas) as saved:
      expected_metrics = json.loads(str(saved['metrics']))
      expected_state = {name: saved[name] for name in saved.files
                        if name != 'metrics'}
    for (state, metrics), what in ((on_one_device, '4 chunks'),
                                   (on_two_replicas, '2 replicas x 2 chunks')):
      self.assert_same_training(state, metrics, expected_state,
                                expected_metrics, what)


class OtherStepsMicrobatchesTest(_Comparisons):
  """UDA, supervised and finetuning steps: K chunks equal K replicas."""

  def test_two_chunks_train_like_two_replicas(self):
    strategy = distribute.get_strategy(RunConfig(strategy='mirrored'))
    for build in (build_uda, build_supervised):
      expected_state, expected_metrics = run_steps(build, {}, strategy)
      state, metrics = run_steps(build, {'microbatches': 2})
      self.assert_same_training(state, metrics, expected_state,
                                expected_metrics, build.__name__)
      whole, _ = run_steps(build, {})
      self.assertNotAllClose(whole['model/0'], state['model/0'],
                             msg=build.__name__)


def _flags(*argv):
  flag_values = absl_flags.FlagValues()
  definitions.define(flag_values)
  flag_values(['test', *argv])
  return definitions.to_config(flag_values)


class RefusalTest(DataDirTestCase):
  """A K that cannot split the batches is refused before anything is
  written, with one message naming the batch, the K and the fix."""

  def test_flags_refuse_a_count_that_does_not_divide_the_batch(self):
    self.assertEqual(_flags('--microbatches=4', '--nosync_batch_norm',
                            '--labeled_batch_size=16').mpl.microbatches, 4)
    with self.assertRaisesRegex(
        ConfigError, re.escape('microbatches=3 does not divide '
                               'labeled_batch_size=16: the batch 16 (and the '
                               'unlabeled 112 per view) must split into 3 '
                               'equal chunks. Pass --microbatches in '
                               '[1, 2, 4, 8, 16]')):
      _flags('--microbatches=3', '--nosync_batch_norm',
             '--labeled_batch_size=16', '--uda_ratio=7')
    with self.assertRaisesRegex(ConfigError, re.escape(
        'microbatches=4 does not divide finetune_batch_size=6')):
      _flags('--microbatches=4', '--nosync_batch_norm',
             '--labeled_batch_size=16', '--finetune_steps=5',
             '--finetune_batch_size=6')
    with self.assertRaisesRegex(ConfigError, 'pass --nosync_batch_norm or '
                                             '--microbatches=1'):
      _flags('--microbatches=2', '--labeled_batch_size=16')
    with self.assertRaisesRegex(ConfigError, 'microbatches=0 must be '
                                             'positive'):
      _flags('--microbatches=0')

  def test_a_replica_share_that_does_not_split_is_refused_before_writing(self):
    model_dir = os.path.join(self.get_temp_dir(), 'run')
    config = _flags('--dataset=digits', f'--data_dir={self.data_dir}',
                    f'--model_dir={model_dir}', '--strategy=mirrored',
                    '--labeled_batch_size=4', '--microbatches=4',
                    '--nosync_batch_norm', '--image_size=8',
                    '--labeled_per_class=2', '--num_validation=100',
                    '--num_test=100')
    with self.assertRaisesRegex(ConfigError, re.escape(
        'microbatches=4 does not divide labeled_batch_size=4: its '
        'per-replica share 2 (4 over 2 replicas) (and the unlabeled 8 per '
        'view) must split into 4 equal chunks. Pass --microbatches in '
        '[1, 2]')):
      train.run(config)
    self.assertFalse(tf.io.gfile.exists(model_dir))

  def test_networks_with_synchronized_batch_norm_are_refused(self):
    # (Imported here: the rest of this file also runs on the commit before
    # microbatches, for K1_DIGESTS.)
    from mpl_tf.microbatches import Microbatches  # pylint: disable=g-import-not-at-top
    inputs = keras.Input((INPUT_DIM,))
    model = keras.Model(inputs, keras.layers.BatchNormalization(
        synchronized=True, name='synced_bn')(inputs))
    self.assertEqual(Microbatches(1, [model]).count, 1)
    with self.assertRaisesRegex(ValueError, "synced_bn.*nosync_batch_norm"):
      Microbatches(2, [model])


if __name__ == '__main__':
  # Run as `TF_ENABLE_ONEDNN_OPTS=0 python -m tests.test_microbatches ...`
  # from the repository's root: the kernels of the test suite, and its two
  # logical CPUs, or four for the four-replica reference.
  if sys.argv[1] == 'four_replicas':
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices('CPU')[0],
        [tf.config.LogicalDeviceConfiguration()] * 4)
    _four_replica_reference(sys.argv[2])
  elif sys.argv[1:] == ['k1_reference']:
    from tests import conftest  # pylint: disable=unused-import
    print(json.dumps(_k1_reference(), indent=2))
