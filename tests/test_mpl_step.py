"""One MPL step against an independent recomputation, in float64.

The recomputation below uses only TensorFlow ops and the functional twin of
the tiny networks: no library loss, no library step. It writes out
  theta_S' = theta_S - eta_S * grad CE(y_hat, S(x_u))
  h        = eta_S * grad L_l(theta_S')^T grad CE(y_hat, S(x_u))   (exact)
           = L_l(theta_S) - L_l(theta_S')                         (taylor)
  theta_T' = theta_T - eta_T * (h * grad CE(y_hat, T(x_u)) + g_sup + w * g_uda)
with the pseudo labels y_hat the step reports it sampled.
"""

import os

import keras
import numpy as np
import tensorflow as tf
from absl import flags as absl_flags

from flags import definitions
from mpl_tf import distribute
from mpl_tf import losses
from mpl_tf import optim
from mpl_tf.config import (Config, ConfigError, MplConfig, OptimConfig,
                           RunConfig)
from mpl_tf.config_checks import validate
from mpl_tf.models import batch_norm_statistics
from mpl_tf.mpl_step import MplStep
from tests.tiny_models import keras_mlp, mlp_apply, random_batch, snapshot

INPUT_DIM, HIDDEN, NUM_CLASSES = 4, 6, 3
NUM_LABELED, NUM_UNLABELED = 4, 6
TEACHER_LR, STUDENT_LR = 0.3, 0.4
UDA_TEMPERATURE, UDA_THRESHOLD, UDA_WEIGHT, UDA_STEPS = 0.7, 0.65, 2.0, 4
STEP_BEFORE = 3   # so the UDA ramp weight is 0.75 * UDA_WEIGHT, not 0
PLAIN_SGD = OptimConfig(momentum=0.0, nesterov=False, weight_decay=0.0,
                        grad_clip_norm=1e9)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_step(mpl_config: MplConfig, seed: int = 0) -> MplStep:
  teacher = keras_mlp(INPUT_DIM, HIDDEN, NUM_CLASSES, seed, 'teacher')
  student = keras_mlp(INPUT_DIM, HIDDEN, NUM_CLASSES, seed + 10, 'student')
  step = MplStep(
      mpl_config, PLAIN_SGD, teacher, student,
      optim.make_optimizer(TEACHER_LR, PLAIN_SGD, 'teacher_optimizer'),
      optim.make_optimizer(STUDENT_LR, PLAIN_SGD, 'student_optimizer'),
      global_labeled_batch=NUM_LABELED, global_unlabeled_batch=NUM_UNLABELED,
      seed=seed)
  step.step.assign(STEP_BEFORE)
  return step


def mpl_config(**overrides) -> MplConfig:
  fields = dict(uda_temperature=UDA_TEMPERATURE, uda_threshold=UDA_THRESHOLD,
                uda_weight=UDA_WEIGHT, uda_steps=UDA_STEPS)
  fields.update(overrides)
  return MplConfig(**fields)


def mean_hard_ce(logits, label_ids):
  log_probs = tf.nn.log_softmax(logits)
  return -tf.reduce_mean(tf.gather(log_probs, label_ids, batch_dims=1))


def expected_update(teacher, student, batch, label_ids, feedback, mpl_weight,
                    teacher_lr, student_lr):
  """Independent recomputation of one step; returns (teacher', student', h)."""
  x_labeled, labels = batch['labeled_images'], batch['labels']
  x_ori, x_aug = batch['unlabeled_images_ori'], batch['unlabeled_images_aug']
  with tf.GradientTape() as tape:
    tape.watch(student)
    pseudo_loss = mean_hard_ce(mlp_apply(student, x_aug), label_ids)
  pseudo_grads = tape.gradient(pseudo_loss, student)
  new_student = [w - student_lr * g for w, g in zip(student, pseudo_grads)]
  with tf.GradientTape() as tape:
    tape.watch(new_student)
    loss_new = mean_hard_ce(mlp_apply(new_student, x_labeled), labels)
  grads_new = tape.gradient(loss_new, new_student)
  loss_old = mean_hard_ce(mlp_apply(student, x_labeled), labels)
  if feedback == 'exact':
    h = student_lr * sum(float(tf.reduce_sum(a * b))
                         for a, b in zip(grads_new, pseudo_grads))
  else:
    h = float(loss_old - loss_new)

  uda_weight = UDA_WEIGHT * min(1.0, STEP_BEFORE / UDA_STEPS)
  with tf.GradientTape() as tape:
    tape.watch(teacher)
    supervised = mean_hard_ce(mlp_apply(teacher, x_labeled), labels)
    target = tf.stop_gradient(
        tf.nn.softmax(mlp_apply(teacher, x_ori) / UDA_TEMPERATURE))
    mask = tf.cast(tf.reduce_max(target, -1) >= UDA_THRESHOLD, tf.float64)
    per_example = -tf.reduce_sum(
        target * tf.nn.log_softmax(mlp_apply(teacher, x_aug)), -1)
    uda = tf.reduce_sum(mask * per_example) / NUM_UNLABELED
    mpl_term = mean_hard_ce(mlp_apply(teacher, x_aug), label_ids)
    total = mpl_weight * h * mpl_term + supervised + uda_weight * uda
  teacher_grads = tape.gradient(total, teacher)
  new_teacher = [w - teacher_lr * g for w, g in zip(teacher, teacher_grads)]
  return new_teacher, new_student, h, float(tf.reduce_mean(mask))


class MplStepTest(tf.test.TestCase):

  def _run(self, config: MplConfig, batch_seed: int = 0):
    step = build_step(config)
    before = (snapshot(step.teacher), snapshot(step.student))
    batch = random_batch(batch_seed, NUM_LABELED, NUM_UNLABELED, INPUT_DIM,
                         NUM_CLASSES)
    metrics, outputs = tf.function(step)(batch)
    return step, before, batch, metrics, outputs

  def _check_against_recomputation(self, config: MplConfig):
    step, (teacher0, student0), batch, metrics, outputs = self._run(config)
    label_ids = outputs['pseudo_label_ids']
    teacher_lr = float(step.teacher_optimizer.learning_rate)
    student_lr = float(step.student_optimizer.learning_rate)
    new_teacher, new_student, h, mask_rate = expected_update(
        teacher0, student0, batch, label_ids, config.feedback,
        config.mpl_weight, teacher_lr, student_lr)
    # The test is not vacuous: h, the mask and the MPL term all matter.
    self.assertGreater(abs(h), 1e-4)
    self.assertBetween(mask_rate, 0.01, 0.99)
    self.assertAllClose(float(metrics['mpl/h']), h, rtol=1e-5)
    self.assertAllClose(snapshot(step.student), new_student, rtol=1e-5, atol=1e-9)
    self.assertAllClose(snapshot(step.teacher), new_teacher, rtol=1e-5, atol=1e-9)
    # Both networks moved, each by its own rule (never swapped).
    for before, after in ((teacher0, step.teacher), (student0, step.student)):
      moved = [float(tf.norm(a - b)) for a, b in zip(snapshot(after), before)]
      self.assertTrue(all(m > 1e-6 for m in moved), moved)
    self.assertEqual(int(step.step), STEP_BEFORE + 1)
    return label_ids

  def test_sampled_exact_matches_recomputation(self):
    label_ids = self._check_against_recomputation(mpl_config())
    teacher_argmax = tf.argmax(
        mlp_apply(snapshot(build_step(mpl_config()).teacher),
                  random_batch(0, NUM_LABELED, NUM_UNLABELED, INPUT_DIM,
                               NUM_CLASSES)['unlabeled_images_aug']), -1)
    # Sampling is real: with 6 draws from a non-peaked teacher, some differ
    # from the argmax (fixed seeds make this deterministic).
    self.assertNotAllEqual(label_ids, tf.cast(teacher_argmax, tf.int32))

  def test_sampled_taylor_matches_recomputation(self):
    self._check_against_recomputation(mpl_config(feedback='taylor'))

  def test_argmax_exact_matches_recomputation(self):
    self._check_against_recomputation(mpl_config(pseudo_label='argmax'))

  def test_teacher_original_view_without_backward_matches_recomputation(self):
    # Without batch norm (and dropout) the separate, tape-free pass on x_u
    # computes the same UDA target, so the step is the same algorithm; with
    # batch norm the batches differ, which is why it is not the default.
    self._check_against_recomputation(
        mpl_config(teacher_original_pass='no_grad'))

  def test_rematerialized_teacher_matches_recomputation(self):
    self._check_against_recomputation(mpl_config(rematerialize_teacher=True))

  def test_teacher_original_pass_no_grad_needs_the_augmented_view(self):
    config = Config(mpl=MplConfig(teacher_original_pass='no_grad',
                                  student_view='ori'))
    with self.assertRaisesRegex(ConfigError, 'needs student_view=aug'):
      validate(config)

  def test_released_sign_negates_h(self):
    _, _, _, paper, _ = self._run(mpl_config(feedback='taylor'))
    _, _, _, released, _ = self._run(
        mpl_config(feedback='taylor', feedback_sign='released_code'))
    self.assertAllClose(float(released['mpl/h']), -float(paper['mpl/h']))

  def test_baseline_is_updated_then_subtracted(self):
    step, _, _, metrics, _ = self._run(mpl_config(baseline_decay=0.9))
    h_raw = float(metrics['mpl/h_raw'])
    self.assertAllClose(float(step.baseline), 0.1 * h_raw)
    self.assertAllClose(float(metrics['mpl/h']), h_raw - 0.1 * h_raw)

  def test_mpl_weight_zero_is_the_uda_teacher(self):
    config = mpl_config(mpl_weight=0.0)
    step, (teacher0, _), batch, _, outputs = self._run(config)
    uda_teacher, _, _, _ = expected_update(
        teacher0, snapshot(build_step(config).student), batch,
        outputs['pseudo_label_ids'], 'exact', 0.0,
        float(step.teacher_optimizer.learning_rate),
        float(step.student_optimizer.learning_rate))
    self.assertAllClose(snapshot(step.teacher), uda_teacher, rtol=1e-12,
                        atol=1e-14)
    # Whatever the feedback settings, the teacher's update is bit-identical.
    other, _, _, _, _ = self._run(
        mpl_config(mpl_weight=0.0, feedback='taylor', pseudo_label='argmax',
                   feedback_sign='released_code'))
    for a, b in zip(snapshot(step.teacher), snapshot(other.teacher)):
      self.assertAllEqual(a, b)


class ReleasedCodePresetTest(tf.test.TestCase):
  """Facts about the released code's step, read from its preset."""

  def _preset(self):
    flag_values = absl_flags.FlagValues()
    definitions.define(flag_values)
    flag_values(['test', '--flagfile=' + os.path.join(
        REPO, 'flags', 'released_code_step.cfg')])
    return definitions.to_config(flag_values)

  def test_preset_values(self):
    config = self._preset()
    self.assertEqual(config.mpl.pseudo_label, 'soft')
    self.assertEqual(config.mpl.feedback, 'taylor')
    self.assertEqual(config.mpl.feedback_sign, 'released_code')
    self.assertEqual(config.mpl.baseline_decay, 0.99)
    self.assertEqual(config.mpl.baseline_init, 'uniform_sqrt3')
    self.assertEqual(config.mpl.label_smoothing, 0.15)
    self.assertEqual(config.optim.ema_decay, 0.995)
    self.assertEqual(config.unlabeled_batch_size, 896)

  def test_released_mpl_term_has_zero_teacher_gradient(self):
    """The released code's MPL term is CE(stop_gradient(softmax(z)), z).

    Its gradient with respect to z is softmax(z) - softmax(z) = 0, so the
    released teacher trains with the supervised and UDA losses only; the
    value (the teacher's entropy) is not zero.
    """
    config = self._preset()
    teacher = keras_mlp(INPUT_DIM, HIDDEN, NUM_CLASSES, 0, 'teacher')
    inputs = random_batch(0, NUM_LABELED, NUM_UNLABELED, INPUT_DIM,
                          NUM_CLASSES)['unlabeled_images_aug']
    seed = tf.constant([0, 0], tf.int64)

    def term_and_grads(mode):
      with tf.GradientTape() as tape:
        logits = teacher(inputs)
        targets, _ = losses.pseudo_labels(logits, mode, seed)
        term = losses.cross_entropy(targets, logits, NUM_UNLABELED)
      return term, tape.gradient(term, teacher.trainable_variables)

    term, grads = term_and_grads(config.mpl.pseudo_label)
    self.assertGreater(float(term), 0.1)
    for grad in grads:
      self.assertAllClose(grad, tf.zeros_like(grad), atol=1e-15)
    _, sampled_grads = term_and_grads('sampled')
    self.assertGreater(max(float(tf.norm(g)) for g in sampled_grads), 1e-3)

    # The whole step agrees: the released step moves the teacher as the
    # UDA-only teacher does (up to float rounding of a zero gradient).
    step_config = mpl_config(
        **{k: getattr(config.mpl, k) for k in (
            'pseudo_label', 'feedback', 'feedback_sign', 'baseline_decay',
            'baseline_init', 'student_view')})
    released = build_step(step_config)
    uda_only = build_step(mpl_config(**{**step_config.__dict__,
                                        'mpl_weight': 0.0}))
    batch = random_batch(0, NUM_LABELED, NUM_UNLABELED, INPUT_DIM, NUM_CLASSES)
    metrics, _ = tf.function(released)(batch)
    tf.function(uda_only)(batch)
    self.assertGreater(abs(float(metrics['mpl/h'])), 1e-3)
    self.assertAllClose(snapshot(released.teacher), snapshot(uda_only.teacher),
                        rtol=1e-13, atol=1e-15)


class LoggedRatesTest(tf.test.TestCase):

  def test_logged_rates_are_the_rates_of_the_update(self):
    # Rates that change every step: each step must log the rates its own
    # updates used (the schedules at its step), not the next step's.
    rates = {name: keras.optimizers.schedules.PolynomialDecay(peak, 10, 0.0)
             for name, peak in (('teacher', TEACHER_LR),
                                ('student', STUDENT_LR))}
    step = MplStep(
        mpl_config(), PLAIN_SGD,
        keras_mlp(INPUT_DIM, HIDDEN, NUM_CLASSES, 0, 'teacher'),
        keras_mlp(INPUT_DIM, HIDDEN, NUM_CLASSES, 10, 'student'),
        optim.make_optimizer(rates['teacher'], PLAIN_SGD, 'teacher_optimizer'),
        optim.make_optimizer(rates['student'], PLAIN_SGD, 'student_optimizer'),
        global_labeled_batch=NUM_LABELED,
        global_unlabeled_batch=NUM_UNLABELED)
    run = tf.function(step)
    batch = random_batch(0, NUM_LABELED, NUM_UNLABELED, INPUT_DIM, NUM_CLASSES)
    for iteration in range(3):
      metrics, _ = run(batch)
      for name, rate in rates.items():
        self.assertAllClose(float(metrics[f'{name}/learning_rate']),
                            float(rate(iteration)), msg=f'{name} {iteration}')


class MirroredStrategyTest(tf.test.TestCase):
  """Two replicas on two logical CPUs (tests/conftest.py) equal one device.

  Each replica sees half of the global batch; losses are divided by the
  global batch and gradients summed where the step says, so the update, h
  and the EMA student must be those of one device on the whole batch.
  """

  def _step_with_ema(self, config):
    step = build_step(config)
    ema_student = keras_mlp(INPUT_DIM, HIDDEN, NUM_CLASSES, 99, 'ema_student')
    ema_student.set_weights(step.student.get_weights())
    step.ema_student = ema_student
    return step

  def test_two_replicas_match_one_device(self):
    # Sampled pseudo labels (Algorithm 1): each replica draws the rows of the
    # global batch it holds, so two replicas draw what one device draws.
    config = mpl_config(pseudo_label='sampled', baseline_decay=0.5)
    batch = random_batch(0, NUM_LABELED, NUM_UNLABELED, INPUT_DIM, NUM_CLASSES)
    single = self._step_with_ema(config)
    single_metrics, single_outputs = tf.function(single)(batch)

    strategy = distribute.get_strategy(RunConfig(strategy='mirrored'))
    self.assertEqual(strategy.num_replicas_in_sync, 2)
    with strategy.scope():
      mirrored = self._step_with_ema(config)

    def half_batch(context):
      index = context.replica_id_in_sync_group
      return {key: tf.split(value, 2)[index] for key, value in batch.items()}

    per_replica = strategy.experimental_distribute_values_from_function(
        half_batch)
    metrics, outputs = tf.function(
        lambda b: strategy.run(mirrored, args=(b,)))(per_replica)
    labels = np.concatenate([ids.numpy() for ids in strategy
                             .experimental_local_results(
                                 outputs['pseudo_label_ids'])])
    self.assertAllEqual(labels, single_outputs['pseudo_label_ids'])
    # Not all one class: a draw that ignored the row would still agree.
    self.assertGreater(len(np.unique(labels)), 1)
    for key in ('mpl/h', 'mpl/baseline', 'teacher/supervised_loss',
                'teacher/uda_loss', 'student/labeled_loss_old',
                'student/labeled_loss_new', 'student/pseudo_label_loss'):
      for value in strategy.experimental_local_results(metrics[key]):
        self.assertAllClose(float(value), float(single_metrics[key]),
                            rtol=1e-9, msg=key)
    for name in ('teacher', 'student', 'ema_student'):
      self.assertAllClose(snapshot(getattr(mirrored, name)),
                          snapshot(getattr(single, name)), rtol=1e-9,
                          atol=1e-12, msg=name)


def _mlp_with_batch_norm_and_dropout(seed: int, name: str) -> keras.Model:
  """Dense -> BN -> ReLU -> Dropout(0.5) -> Dense, float64."""
  init = lambda s: keras.initializers.RandomNormal(stddev=0.7, seed=s)
  inputs = keras.Input((INPUT_DIM,), dtype='float64')
  x = keras.layers.Dense(HIDDEN, dtype='float64',
                         kernel_initializer=init(seed))(inputs)
  x = keras.layers.BatchNormalization(dtype='float64', momentum=0.5)(x)
  x = keras.layers.Activation('relu', dtype='float64')(x)
  x = keras.layers.Dropout(0.5, seed=seed, dtype='float64')(x)
  logits = keras.layers.Dense(NUM_CLASSES, dtype='float64',
                              kernel_initializer=init(seed + 1))(x)
  return keras.Model(inputs, logits, name=name)


def _batch_norm_mpl_step(**fields):
  """(MplStep, teacher, student): BN + dropout MLPs, plain SGD."""
  teacher = _mlp_with_batch_norm_and_dropout(0, 'teacher')
  student = _mlp_with_batch_norm_and_dropout(10, 'student')
  step = MplStep(
      mpl_config(**fields), PLAIN_SGD, teacher, student,
      optim.make_optimizer(TEACHER_LR, PLAIN_SGD, 'teacher_optimizer'),
      optim.make_optimizer(STUDENT_LR, PLAIN_SGD, 'student_optimizer'),
      global_labeled_batch=NUM_LABELED,
      global_unlabeled_batch=NUM_UNLABELED)
  return step, teacher, student


class RematerializedTeacherTest(tf.test.TestCase):
  """rematerialize_teacher changes memory, not numbers, with BN and dropout."""

  def _two_steps(self, **fields):
    step, _, _ = _batch_norm_mpl_step(**fields)
    step.step.assign(STEP_BEFORE)
    run = tf.function(step)
    for batch_seed in (0, 1):
      metrics, _ = run(random_batch(batch_seed, NUM_LABELED, NUM_UNLABELED,
                                    INPUT_DIM, NUM_CLASSES))
    return step, metrics

  def test_same_updates_statistics_and_rng_states(self):
    for extra in ({}, {'teacher_original_pass': 'no_grad'}):
      kept, kept_metrics = self._two_steps(**extra)
      rematerialized, metrics = self._two_steps(rematerialize_teacher=True,
                                                **extra)
      self.assertNotEqual(float(metrics['mpl/h']), 0.0)
      self.assertAllClose(metrics['mpl/h'], kept_metrics['mpl/h'],
                          rtol=1e-10)
      for network in ('teacher', 'student'):
        mine = getattr(rematerialized, network).weights   # incl. BN, RNG
        theirs = getattr(kept, network).weights
        self.assertLen(mine, len(theirs))
        for a, b in zip(mine, theirs):
          self.assertAllClose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12,
                              msg=f'{network}/{a.path}')

  def test_two_replicas_replay_rng_and_statistics_like_the_kept_pass(self):
    # Under MirroredStrategy the replayed pass restores mirrored batch-norm
    # statistics and per-replica RNG states in replica context.
    strategy = distribute.get_strategy(RunConfig(strategy='mirrored'))
    batch = random_batch(0, NUM_LABELED, NUM_UNLABELED, INPUT_DIM, NUM_CLASSES)

    def half_batch(context):
      index = context.replica_id_in_sync_group
      return {key: tf.split(value, 2)[index] for key, value in batch.items()}

    results = {}
    for rematerialize in (False, True):
      with strategy.scope():
        teacher = _mlp_with_batch_norm_and_dropout(0, 'teacher')
        student = _mlp_with_batch_norm_and_dropout(10, 'student')
        step = MplStep(
            mpl_config(rematerialize_teacher=rematerialize), PLAIN_SGD,
            teacher, student,
            optim.make_optimizer(TEACHER_LR, PLAIN_SGD, 'teacher_optimizer'),
            optim.make_optimizer(STUDENT_LR, PLAIN_SGD, 'student_optimizer'),
            global_labeled_batch=NUM_LABELED,
            global_unlabeled_batch=NUM_UNLABELED)
      per_replica = strategy.experimental_distribute_values_from_function(
          half_batch)
      tf.function(lambda b: strategy.run(step, args=(b,)))(per_replica)
      results[rematerialize] = [v.numpy() for v in teacher.weights +
                                student.weights]
    for kept, replayed in zip(results[False], results[True]):
      self.assertAllClose(replayed, kept, rtol=1e-10, atol=1e-12)


class MeasuringPassesLeaveNoTraceTest(tf.test.TestCase):
  """Passes that only measure move no batch-norm statistics.

  After one step, each network's moving mean must be one update (momentum
  0.5 from 0) with the batch mean of its one training pass: the student's
  [x_u_aug; x_l] (not again by the labeled pass at the new weights), the
  teacher's [x_l; x_u_ori; x_u_aug], or [x_l; x_u_aug] when the original
  view has a pass of its own (teacher_original_pass=no_grad).
  """

  def _expected_moving_mean(self, kernel_bias, images):
    kernel, bias = kernel_bias
    return 0.5 * np.mean(np.concatenate(images) @ kernel + bias, axis=0)

  def _check(self, teacher_inputs, **fields):
    step, teacher, student = _batch_norm_mpl_step(**fields)
    first_dense = lambda model: [
        v.numpy() for v in model.layers[1].weights]   # Dense before BN
    teacher_dense, student_dense = first_dense(teacher), first_dense(student)
    batch = {k: v.numpy() for k, v in random_batch(
        0, NUM_LABELED, NUM_UNLABELED, INPUT_DIM, NUM_CLASSES).items()}
    tf.function(step)(batch)
    moving_mean = lambda model: model.layers[2].moving_mean.numpy()
    self.assertAllClose(
        moving_mean(student),
        self._expected_moving_mean(student_dense, [
            batch['unlabeled_images_aug'], batch['labeled_images']]))
    self.assertAllClose(
        moving_mean(teacher),
        self._expected_moving_mean(teacher_dense,
                                   [batch[k] for k in teacher_inputs]))

  def test_default_step(self):
    self._check(('labeled_images', 'unlabeled_images_ori',
                 'unlabeled_images_aug'))

  def test_original_view_without_backward(self):
    self._check(('labeled_images', 'unlabeled_images_aug'),
                teacher_original_pass='no_grad')


class FrozenTeacherStatisticsTest(tf.test.TestCase):
  """freeze_teacher_batch_norm_statistics: the released teacher's statistics.

  One step of BN + dropout MLPs from the same start, in K=2 chunks, frozen
  and not: frozen, the teacher's moving means and variances (by object) are
  their values before the step; not frozen, they move. Every other weight of both networks, the student's statistics
  included, is the same either way: training passes normalise with batch
  statistics, so freezing changes what the teacher is evaluated with only.
  """

  def _one_step(self, **fields):
    """(teacher statistics before, after, {network: [(is one, value)]})."""
    step, teacher, student = _batch_norm_mpl_step(**fields)
    statistics = batch_norm_statistics(teacher)
    self.assertLen(statistics, 2)
    before = [v.numpy() for v in statistics]
    tf.function(step)(random_batch(0, NUM_LABELED, NUM_UNLABELED, INPUT_DIM,
                                   NUM_CLASSES))
    ids = {id(v) for v in statistics}
    weights = {name: [(id(v) in ids, v.numpy()) for v in network.weights]
               for name, network in (('teacher', teacher),
                                     ('student', student))}
    return before, [v.numpy() for v in statistics], weights

  def test_frozen_statistics_stay_and_default_ones_move(self):
    # K=2 chunks: each chunk's untaped (rematerialized) and taped teacher
    # pass, whose moves microbatches.py averages; every teacher pass that
    # can move the statistics goes through TeacherPass._training_pass.
    before, after, moving = self._one_step(microbatches=2)
    for start, end in zip(before, after):
      self.assertGreater(np.abs(end - start).max(), 1e-3)
    before, after, frozen = self._one_step(
        microbatches=2, freeze_teacher_batch_norm_statistics=True)
    for start, end in zip(before, after):
      self.assertAllEqual(end, start)
    for name in ('teacher', 'student'):
      for (statistic, a), (_, b) in zip(moving[name], frozen[name]):
        if statistic:
          self.assertFalse(np.array_equal(a, b))
        else:
          self.assertAllEqual(a, b)
