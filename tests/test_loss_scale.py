"""float16 that trains: dynamic loss scaling in every step (loss_scale.py).

Tiny two-layer networks whose hidden layer computes in float16 and whose
logits are float32 (as `precision=mixed_float16` builds ours), on CPU. The
losses are divided by a global batch of 2**24 (and the rates multiplied by
it): the gradients reaching the float16 layer are then below float16's
smallest number, 2**-24, as a large global batch makes them in practice. A
twin in float32 is the reference: the scaled float16 steps must follow it,
the unscaled ones do not.
"""

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from mpl_tf import distribute
from mpl_tf import loss_scale
from mpl_tf import optim
from mpl_tf.config import MplConfig, OptimConfig, RunConfig
from mpl_tf.mpl_step import MplStep
from mpl_tf.supervised_step import SupervisedStep
from mpl_tf.uda_step import UdaStep

INPUT_DIM, HIDDEN, NUM_CLASSES, NUM_LABELED, NUM_UNLABELED = 4, 6, 3, 4, 6
UNDERFLOW = 2.0 ** 24      # the global-batch factor that underflows
TEACHER_LR, STUDENT_LR = 0.3, 0.4
NO_DECAY = OptimConfig(momentum=0.9, weight_decay=0.0, grad_clip_norm=1e9)
# Non-trivial state for the skip tests: slots, decay, EMA, baseline.
MOMENTUM = OptimConfig(momentum=0.9, weight_decay=1e-3, ema_decay=0.5)
# float16 rounding of the hidden layer (2**-11 relative) over three steps.
WEIGHT_TOLERANCE = 2e-3
H_TOLERANCE = 2e-2


def mlp(policy: str, seed: int, name: str) -> keras.Model:
  """x -> tanh(x W1 + b1) W2 + b2; the hidden layer in `policy`."""
  init = lambda s: keras.initializers.RandomNormal(stddev=0.7, seed=s)
  inputs = keras.Input((INPUT_DIM,))
  hidden = keras.layers.Dense(HIDDEN, activation='tanh', dtype=policy,
                              kernel_initializer=init(seed),
                              bias_initializer=init(seed + 1))(inputs)
  logits = keras.layers.Dense(NUM_CLASSES, dtype='float32',
                              kernel_initializer=init(seed + 2),
                              bias_initializer=init(seed + 3))(hidden)
  return keras.Model(inputs, logits, name=name)


def batch(seed: int):
  rng = np.random.default_rng(seed)
  images = lambda n: tf.constant(rng.normal(size=(n, INPUT_DIM)), tf.float32)
  return {'labeled_images': images(NUM_LABELED),
          'labels': tf.constant(rng.integers(0, NUM_CLASSES, NUM_LABELED)),
          'unlabeled_images_ori': images(NUM_UNLABELED),
          'unlabeled_images_aug': images(NUM_UNLABELED)}


def poisoned(values, key, value):
  images = values[key].numpy().copy()
  images[0, 0] = value
  return {**values, key: tf.constant(images)}


def mpl_step(policy: str, factor: float = 1.0, optim_config=MOMENTUM,
             nonfinite: str = 'stop', **mpl) -> MplStep:
  teacher, student = mlp(policy, 0, 'teacher'), mlp(policy, 10, 'student')
  ema_student = mlp(policy, 10, 'ema_student')
  return MplStep(
      MplConfig(uda_threshold=0.0, **mpl), optim_config, teacher, student,
      optim.make_optimizer(TEACHER_LR * factor, optim_config,
                           'teacher_optimizer', teacher),
      optim.make_optimizer(STUDENT_LR * factor, optim_config,
                           'student_optimizer', student),
      global_labeled_batch=NUM_LABELED * factor,
      global_unlabeled_batch=NUM_UNLABELED * factor,
      ema_student=ema_student, nonfinite=nonfinite)


def float_state(*objects):
  """Every float variable's value (networks, slots, EMA, baseline)."""
  values = []
  for item in objects:
    variables = item.variables if hasattr(item, 'variables') else [item]
    values += [np.array(tf.convert_to_tensor(v)) for v in variables
               if tf.as_dtype(v.dtype).is_floating]
  return values


def mpl_state(step: MplStep):
  return float_state(step.teacher, step.student, step.ema_student,
                     step.teacher_optimizer, step.student_optimizer,
                     step.baseline)


def counters(step: MplStep):
  guard = step.guard
  return [int(v.numpy()) for v in (guard.skipped_steps,
                                   guard.consecutive_skipped,
                                   guard.first_step, guard.first_terms)]


class UnderflowTest(tf.test.TestCase):
  """Without scaling the float16 layer gets no gradient; with it, float32's."""

  def assert_weights_close(self, model, reference, name):
    for index, (value, expected) in enumerate(zip(model.get_weights(),
                                                  reference.get_weights())):
      self.assertAllClose(value, expected, atol=WEIGHT_TOLERANCE, rtol=0,
                          msg=f'{name} weight {index}')

  def test_float16_gradient_flushes_to_zero_unscaled(self):
    # The problem itself, outside the library: the float16 layer's kernel
    # gradient of a loss divided by 2**24 is exactly zero; float32's is not.
    x = batch(0)['labeled_images']
    for policy, nonzero in (('float32', True), ('mixed_float16', False)):
      model = mlp(policy, 0, policy)
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x)[:, 0]) / UNDERFLOW
      kernel = tape.gradient(loss, model.trainable_variables)[0]
      self.assertEqual(bool(np.any(kernel.numpy() != 0)), nonzero, policy)

  def _check_mpl_follows_float32(self, feedback, microbatches=1):
    reference = mpl_step('float32', UNDERFLOW, NO_DECAY, feedback=feedback)
    scaled = mpl_step('mixed_float16', UNDERFLOW, NO_DECAY, feedback=feedback,
                      microbatches=microbatches)
    self.assertFalse(reference.student_scale.active)
    self.assertTrue(scaled.student_scale.active and
                    scaled.teacher_scale.active)
    first_kernel = scaled.student.trainable_variables[0].numpy()
    for index in range(3):
      expected, expected_out = reference(batch(index))
      metrics, outputs = scaled(batch(index))
      # Same pseudo labels, so the comparison is of the updates alone.
      self.assertAllEqual(outputs['pseudo_label_ids'],
                          expected_out['pseudo_label_ids'])
      self.assertAllClose(float(metrics['mpl/h']), float(expected['mpl/h']),
                          rtol=H_TOLERANCE, msg=f'h at step {index}')
      self.assertEqual(float(metrics['health/overflow']), 0.0)
      self.assertEqual(float(metrics['loss_scale/student']),
                       loss_scale.INITIAL_SCALE)
    for name in ('teacher', 'student', 'ema_student'):
      self.assert_weights_close(getattr(scaled, name),
                                getattr(reference, name), name)
    # The float16 layer learned (unscaled, it does not move at all).
    self.assertGreater(np.abs(scaled.student.trainable_variables[0].numpy() -
                              first_kernel).max(), 0.1)

  def test_mpl_exact_feedback_follows_float32(self):
    self._check_mpl_follows_float32('exact')

  def test_mpl_taylor_feedback_follows_float32(self):
    self._check_mpl_follows_float32('taylor')

  def test_mpl_in_two_chunks_follows_float32(self):
    # --microbatches=2: each chunk's loss scaled, the sum unscaled once.
    # (No batch norm or dropout here, so two chunks equal the whole batch.)
    self._check_mpl_follows_float32('exact', microbatches=2)

  def test_uda_and_supervised_steps_follow_float32(self):
    def uda(policy):
      model = mlp(policy, 0, 'uda')
      return model, UdaStep(
          MplConfig(uda_threshold=0.0), NO_DECAY, model,
          optim.make_optimizer(TEACHER_LR * UNDERFLOW, NO_DECAY, 'opt', model),
          global_labeled_batch=NUM_LABELED * UNDERFLOW,
          global_unlabeled_batch=NUM_UNLABELED * UNDERFLOW)

    def supervised(policy):
      model = mlp(policy, 0, 'supervised')
      return model, SupervisedStep(
          model, optim.make_optimizer(TEACHER_LR * UNDERFLOW, NO_DECAY, 'opt',
                                      model),
          NO_DECAY, 0.0, NUM_LABELED * UNDERFLOW)

    for make in (uda, supervised):
      (reference, reference_step), (model, step) = (make('float32'),
                                                    make('mixed_float16'))
      self.assertTrue(step.loss_scale.active)
      first_kernel = model.trainable_variables[0].numpy()
      for index in range(2):
        reference_step(batch(index))
        step(batch(index))
      self.assert_weights_close(model, reference, make.__name__)
      self.assertGreater(np.abs(model.trainable_variables[0].numpy() -
                                first_kernel).max(), 0.1, make.__name__)


class OverflowTest(tf.test.TestCase):
  """An overflow undoes the step, halves its scale, and is no divergence."""

  def _assert_overflow(self, step, run, values, halved, kept):
    state, before = mpl_state(step), counters(step)
    iterations = [int(step.step), int(step.teacher_optimizer.iterations),
                  int(step.student_optimizer.iterations)]
    scale, other = float(halved.scale), float(kept.scale)
    overflows = int(halved.overflow_steps)
    metrics, _ = run(values)
    self.assertEqual(float(metrics['health/overflow']), 1.0)
    self.assertEqual(float(metrics['health/nonfinite']), 0.0)
    for old, new in zip(state, mpl_state(step)):
      self.assertAllEqual(old, new)   # weights, BN, slots, EMA, baseline
    self.assertEqual(counters(step), before)   # no non-finite step counted
    self.assertEqual(float(halved.scale), scale / 2)
    self.assertEqual(int(halved.overflow_steps), overflows + 1)
    self.assertEqual(float(kept.scale), other)
    self.assertEqual(int(halved.good_steps), 0)
    # As for any skipped step: the step and the rates' counters go on.
    self.assertEqual([int(step.step), int(step.teacher_optimizer.iterations),
                      int(step.student_optimizer.iterations)],
                     [i + 1 for i in iterations])

  def test_student_and_teacher_overflow_skip_the_step(self):
    # --nonfinite=stop (the default): the step is undone all the same.
    step = mpl_step('mixed_float16', baseline_decay=0.9)
    for run in (step, tf.function(step)):
      run(batch(0))   # a good step first: slots, EMA, baseline non-trivial
      # 2**24 times the gradients of a batch divided by 4 is far above
      # float16's 65504 in the hidden layer's backward pass.
      step.student_scale.scale.assign(2.0 ** 24)
      self._assert_overflow(step, run, batch(1), step.student_scale,
                            step.teacher_scale)
      step.student_scale.scale.assign(2.0 ** 15)
      # The teacher's overflow comes after the student's update: that is
      # undone too.
      step.teacher_scale.scale.assign(2.0 ** 24)
      self._assert_overflow(step, run, batch(2), step.teacher_scale,
                            step.student_scale)
      step.teacher_scale.scale.assign(2.0 ** 15)
      before = mpl_state(step)
      metrics, _ = run(batch(3))   # and training goes on
      self.assertEqual(float(metrics['health/overflow']), 0.0)
      self.assertNotAllClose(before[0], mpl_state(step)[0])
    self.assertEqual(counters(step), [0, 0, -1, 0])

  def test_what_is_a_divergence_and_not_an_overflow(self):
    step = mpl_step('mixed_float16')
    step(batch(0))
    # A forward loss that is not finite: no scale can help.
    metrics, _ = step(poisoned(batch(1), 'unlabeled_images_aug', np.nan))
    self.assertEqual(float(metrics['health/nonfinite']), 1.0)
    self.assertEqual(float(metrics['health/overflow']), 0.0)
    self.assertEqual(float(step.student_scale.scale), 2.0 ** 15)
    self.assertIn('teacher/uda_loss', step.guard.describe())
    # Gradients that are NaN with finite losses (tanh saturated by an Inf
    # image): an overflow while the scale can still halve ...
    inf_batch = poisoned(batch(2), 'labeled_images', np.inf)
    step.guard.first_step.assign(-1)
    step.student_scale.scale.assign(2.0)
    metrics, _ = step(inf_batch)
    self.assertEqual(float(metrics['health/overflow']), 1.0)
    self.assertEqual(float(step.student_scale.scale), 1.0)
    self.assertIsNone(step.guard.describe())
    # ... and a non-finite step once it is at its minimum, 1.
    metrics, _ = step(inf_batch)
    self.assertEqual(float(metrics['health/nonfinite']), 1.0)
    self.assertEqual(float(metrics['health/overflow']), 0.0)
    self.assertEqual(float(step.student_scale.scale), 1.0)
    self.assertIn('student/grad_norm', step.guard.describe())
    self.assertEqual(int(step.guard.skipped_steps), 2)

  def test_the_scale_doubles_after_growth_interval_good_steps(self):
    scale = loss_scale.DynamicLossScale('net', True, initial=4.0,
                                        growth_interval=2)
    yes, no = tf.constant(True), tf.constant(False)
    for overflow, ok, expected, good in ((no, yes, 4, 1), (no, yes, 8, 0),
                                         (no, yes, 8, 1), (yes, no, 4, 0),
                                         (no, no, 4, 0), (no, yes, 4, 1),
                                         (no, yes, 8, 0)):
      loss_scale.update([scale], [overflow], ok)
      self.assertEqual((float(scale.scale), int(scale.good_steps)),
                       (expected, good))
    for _ in range(3):
      loss_scale.update([scale], [yes], no)
    self.assertEqual(float(scale.scale), loss_scale.MIN_SCALE)
    scale.scale.assign(loss_scale.MAX_SCALE)
    scale.good_steps.assign(1)
    loss_scale.update([scale], [no], yes)
    self.assertEqual(float(scale.scale), loss_scale.MAX_SCALE)

  def test_two_replicas_decide_alike_on_one_replicas_overflow(self):
    # Only replica 1's rows hold an Inf (NaN local gradients, finite
    # losses); the check reads the summed gradients, so both replicas skip,
    # count an overflow and keep their weights.
    strategy = distribute.get_strategy(RunConfig(strategy='mirrored'))
    self.assertEqual(strategy.num_replicas_in_sync, 2)
    with strategy.scope():
      # (taylor: the student's gradients are differentiated once.)
      step = mpl_step('mixed_float16', feedback='taylor')
    values = batch(0)
    images = values['labeled_images'].numpy().copy()
    images[-1, 0] = np.inf   # the last row: replica 1's half
    values['labeled_images'] = tf.constant(images)
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda context: {key: tf.split(value, 2)[
            context.replica_id_in_sync_group] for key, value in values.items()})
    before = [np.array(v) for v in strategy.experimental_local_results(
        step.student.trainable_variables[0])]
    metrics, _ = tf.function(lambda b: strategy.run(step, args=(b,)))(
        per_replica)
    for value in strategy.experimental_local_results(metrics['health/overflow']):
      self.assertEqual(float(value), 1.0)
    after = strategy.experimental_local_results(
        step.student.trainable_variables[0])
    for old, new in zip(before, after):
      self.assertAllEqual(old, new)
    # The student's overflow: the teacher's gradients, whose loss holds h
    # from the student's undone update, do not halve the teacher's scale.
    for scale in strategy.experimental_local_results(step.student_scale.scale):
      self.assertEqual(float(scale), 2.0 ** 14)
    for scale in strategy.experimental_local_results(step.teacher_scale.scale):
      self.assertEqual(float(scale), 2.0 ** 15)
    self.assertEqual(int(tf.convert_to_tensor(step.guard.skipped_steps)), 0)


class CheckpointTest(tf.test.TestCase):

  def test_scales_survive_a_checkpoint_and_the_resume_is_exact(self):
    step = mpl_step('mixed_float16')
    step(batch(0))
    step.student_scale.scale.assign(2.0 ** 24)
    step(batch(1))   # overflows: halves, forgets its good steps
    index = 2
    while not int(step.student_scale.good_steps):   # halves until it fits
      step(batch(index))
      index += 1
    self.assertBetween(int(step.student_scale.overflow_steps), 1, 10)
    self.assertLess(float(step.student_scale.scale), 2.0 ** 24)
    self.assertTrue(hasattr(step.checkpoint_items()['health'], 'loss_scales'))
    path = tf.train.Checkpoint(**step.checkpoint_items()).save(
        os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), 'ckpt'))
    resumed = mpl_step('mixed_float16')
    tf.train.Checkpoint(**resumed.checkpoint_items()).restore(
        path).assert_consumed()
    for scale in ('student_scale', 'teacher_scale'):
      self.assertEqual(
          [float(v) for v in getattr(resumed, scale).variables],
          [float(v) for v in getattr(step, scale).variables], scale)
    # The next step is the uninterrupted run's, to the bit.
    step.student_scale.growth_interval = resumed.student_scale.growth_interval = 2
    for index in (index, index + 1):
      expected, _ = step(batch(index))
      metrics, _ = resumed(batch(index))
      self.assertEqual(float(metrics['mpl/h']), float(expected['mpl/h']))
    for old, new in zip(mpl_state(step), mpl_state(resumed)):
      self.assertAllEqual(old, new)
    self.assertEqual(float(resumed.student_scale.scale),
                     2 * float(tf.train.load_variable(
                         path, 'health/loss_scales/student/scale/'
                         '.ATTRIBUTES/VARIABLE_VALUE')))

  def test_float32_checkpoints_are_unchanged(self):
    step = mpl_step('float32')
    self.assertEqual(step.guard.loss_scales, [])
    self.assertFalse(hasattr(step.checkpoint_items()['health'],
                             'loss_scales'))
