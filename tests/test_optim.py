"""Optimizers, schedules, weight decay, clipping and EMA against spec 3.8.

The references here are written out from the spec in numpy or plain Python:
  TF1 momentum   a <- mu * a + g;  w <- w - lr * (g + mu * a)  (Nesterov)
                                   w <- w - lr * a             (otherwise)
  schedule       s = step - wait; 0 if s < 0; base * (s + 1) / W if s < W;
                 else base * 0.5 * (1 + cos(pi * min(s - W, D) / D)),
                 D = total - W - wait
  EMA            d = min(decay, (s + 1) / (s + 10));
                 ema <- ema - (1 - d) * (ema - w)
"""

import math
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from mpl_tf import distribute
from mpl_tf import ema
from mpl_tf import optim
from mpl_tf.config import OPTIMIZERS, OptimConfig, RunConfig
from mpl_tf.config import ModelConfig
from mpl_tf.models import (batch_norm_statistics, build_model,
                           normalization_weights)
from mpl_tf.supervised_step import SupervisedStep

SUM = tf.distribute.ReduceOp.SUM
SHAPES = ((3,), (2, 2))


def spec_rate(step, base, total, warmup=0, wait=0):
  """The released code's cosine schedule, spec 3.8, in plain Python."""
  s = step - wait
  if s < 0:
    return 0.0
  if s < warmup:
    return base * (s + 1) / warmup
  decay_steps = total - warmup - wait
  return base * 0.5 * (1 + math.cos(math.pi * min(s - warmup, decay_steps) /
                                    decay_steps))


def tf1_momentum_reference(weights, grad_sequence, rates, momentum, nesterov):
  """Weights and accumulators after each step of TF1's MomentumOptimizer."""
  weights = [np.array(w, np.float64) for w in weights]
  accumulators = [np.zeros_like(w) for w in weights]
  history = []
  for grads, rate in zip(grad_sequence, rates):
    for i, grad in enumerate(grads):
      accumulators[i] = momentum * accumulators[i] + grad
      step = grad + momentum * accumulators[i] if nesterov else accumulators[i]
      weights[i] = weights[i] - rate * step
    history.append(([w.copy() for w in weights],
                    [a.copy() for a in accumulators]))
  return history


def gradient_sequence(num_steps, seed=0):
  rng = np.random.default_rng(seed)
  return [[rng.normal(size=shape) for shape in SHAPES]
          for _ in range(num_steps)]


def make_variables(seed=1):
  rng = np.random.default_rng(seed)
  return [keras.Variable(rng.normal(size=shape), dtype='float64')
          for shape in SHAPES]


def bn_model(seed=0, name='net'):
  """x -> Dense -> BatchNorm -> tanh -> Dense, float64, random biases."""
  init = lambda s: keras.initializers.RandomNormal(stddev=0.5, seed=seed + s)
  inputs = keras.Input((4,), dtype='float64')
  x = keras.layers.Dense(5, dtype='float64', kernel_initializer=init(0),
                         bias_initializer=init(1))(inputs)
  x = keras.layers.BatchNormalization(
      dtype='float64', momentum=0.9, beta_initializer=init(2),
      gamma_initializer=keras.initializers.RandomUniform(0.5, 1.5,
                                                         seed=seed + 3))(x)
  x = keras.layers.Activation('tanh', dtype='float64')(x)
  logits = keras.layers.Dense(3, dtype='float64', kernel_initializer=init(4),
                              bias_initializer=init(5))(x)
  return keras.Model(inputs, logits, name=name)


def values(variables):
  return [np.array(v.numpy()) for v in variables]


# The student's schedule in miniature: 3 steps of wait (lr = 0, momentum
# still accumulates), 3 of warm-up, then cosine to 0 at step 10.
BASE, TOTAL, WARMUP, WAIT = 0.3, 10, 3, 3
NUM_STEPS = 9


class ListsCloseMixin:

  def assertListsClose(self, actual, expected, **kwargs):
    """assertAllClose per element: lists of arrays of different shapes."""
    self.assertLen(actual, len(expected))
    for a, b in zip(actual, expected):
      self.assertAllClose(a, b, **kwargs)


class Tf1MomentumTest(ListsCloseMixin, tf.test.TestCase):

  def _run(self, optimizer, grads_sequence, variables):
    history = []
    for grads in grads_sequence:
      optimizer.apply_gradients(
          zip([tf.constant(g) for g in grads], variables))
      history.append(values(variables))
    return history

  def _check_against_reference(self, nesterov):
    variables = make_variables()
    start = values(variables)
    grads = gradient_sequence(NUM_STEPS)
    optimizer = optim.Tf1Momentum(
        optim.WarmupCosine(BASE, TOTAL, WARMUP, WAIT), momentum=0.9,
        nesterov=nesterov)
    rates = [spec_rate(t, BASE, TOTAL, WARMUP, WAIT) for t in range(NUM_STEPS)]
    self.assertEqual(rates[:WAIT], [0.0] * WAIT)
    expected = tf1_momentum_reference(start, grads, rates, 0.9, nesterov)
    for step, (weights, accumulators) in enumerate(expected):
      optimizer.apply_gradients(
          zip([tf.constant(g) for g in grads[step]], variables))
      self.assertListsClose(values(variables), weights, atol=1e-6, rtol=0)
      self.assertListsClose(values(optimizer.accumulators), accumulators,
                            atol=1e-6, rtol=0)
      if step < WAIT:
        # The wait: the weights stay, the accumulator collects.
        self.assertListsClose(values(variables), start, atol=0, rtol=0)
        self.assertGreater(np.abs(accumulators[0]).sum(), 0.1)
    self.assertEqual(int(optimizer.iterations), NUM_STEPS)

  def test_nesterov_matches_tf1_rule_over_wait_warmup_and_cosine(self):
    self._check_against_reference(nesterov=True)

  def test_heavy_ball_matches_tf1_rule_over_wait_warmup_and_cosine(self):
    self._check_against_reference(nesterov=False)

  def test_keras_sgd_differs_when_rate_changes_equals_when_constant(self):
    """Keras's velocity holds -lr * a only while lr is constant.

    0.875 is exact in float32, where Keras's SGD keeps its momentum, so at a
    constant rate the two differ by rounding only.
    """
    grads = gradient_sequence(NUM_STEPS)
    for schedule, same in (
        (optim.WarmupCosine(BASE, TOTAL, WARMUP, WAIT), False),
        (BASE, True)):
      tf1_vars, keras_vars = make_variables(), make_variables()
      tf1 = self._run(optim.Tf1Momentum(schedule, 0.875, nesterov=True),
                      grads, tf1_vars)
      sgd = self._run(keras.optimizers.SGD(schedule, momentum=0.875,
                                           nesterov=True), grads, keras_vars)
      gap = max(np.abs(a - b).max() for a, b in zip(tf1[-1], sgd[-1]))
      if same:
        self.assertLess(gap, 1e-12)
      else:
        # Keras applies nothing of what was collected during the wait.
        self.assertGreater(gap, 0.1)

  def test_checkpoint_restores_accumulators_and_continues(self):
    config = OptimConfig(momentum=0.9, nesterov=True)
    grads = gradient_sequence(6, seed=3)
    model = bn_model(name='saved')
    optimizer = optim.make_optimizer(
        optim.WarmupCosine(BASE, TOTAL, WARMUP, WAIT), config, 'opt',
        model=model)
    variables = model.trainable_variables
    as_grads = lambda gs: [tf.constant(np.resize(g, v.shape))
                           for g, v in zip(gs * 3, variables)]
    for step in range(4):
      optimizer.apply_gradients(zip(as_grads(grads[step]), variables))
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).write(
        os.path.join(tempfile.mkdtemp(), 'ckpt'))

    restored_model = bn_model(seed=7, name='restored')
    restored = optim.make_optimizer(
        optim.WarmupCosine(BASE, TOTAL, WARMUP, WAIT), config, 'opt',
        model=restored_model)
    tf.train.Checkpoint(model=restored_model, optimizer=restored).read(
        path).assert_consumed()
    self.assertEqual(int(restored.iterations), 4)
    self.assertListsClose(values(restored.accumulators),
                          values(optimizer.accumulators), atol=0, rtol=0)
    self.assertGreater(np.abs(values(restored.accumulators)[0]).sum(), 0.1)
    for step in range(4, 6):
      optimizer.apply_gradients(zip(as_grads(grads[step]), variables))
      restored.apply_gradients(
          zip(as_grads(grads[step]), restored_model.trainable_variables))
    self.assertListsClose(values(restored_model.weights),
                          values(model.weights), atol=0, rtol=0)


class MirroredTest(tf.test.TestCase):
  """Two replicas (tests/conftest.py): summed gradients are applied once."""

  def test_optimizers_do_not_sum_summed_gradients_again(self):
    strategy = distribute.get_strategy(RunConfig(strategy='mirrored'))
    # Exact in float32, as Keras's SGD keeps the rate and the momentum.
    lr, momentum, weight_decay = 0.125, 0.875, 0.01
    models, optimizers = {}, {}
    with strategy.scope():
      for mode in OPTIMIZERS:
        config = OptimConfig(optimizer=mode, momentum=momentum,
                             weight_decay=weight_decay)
        models[mode] = bn_model(name=mode)
        optimizers[mode] = optim.make_optimizer(lr, config, mode,
                                                model=models[mode])
      # Keras's own SGD, to show the hidden second sum the others turn off.
      models['plain'] = bn_model(name='plain')
      optimizers['plain'] = keras.optimizers.SGD(lr, momentum=momentum,
                                                 nesterov=True)
      optimizers['plain'].build(models['plain'].trainable_variables)
    start = values(models['plain'].trainable_variables)
    unit = [np.linspace(-1, 1, int(np.prod(w.shape))).reshape(w.shape)
            for w in start]

    def replica_fn():
      context = tf.distribute.get_replica_context()
      # Replica r holds (r + 1) * unit, so the summed gradient is 3 * unit.
      scale = tf.cast(context.replica_id_in_sync_group + 1, tf.float64)
      for name, model in models.items():
        local = [scale * tf.constant(u) for u in unit]
        summed = context.all_reduce(SUM, local)
        optimizers[name].apply_gradients(
            zip(summed, model.trainable_variables))

    tf.function(lambda: strategy.run(replica_fn))()
    # First Nesterov step from zero state: w - lr * (1 + momentum) * g.
    step = lambda g: lr * (1 + momentum) * g
    exempt = [id(v) for v in normalization_weights(models['keras_sgd'])]
    for name, model in models.items():
      for variable, w0, u in zip(model.trainable_variables, start, unit):
        replicas = [np.array(v) for v in variable.value.values]
        self.assertLen(replicas, 2)
        self.assertAllEqual(replicas[0], replicas[1])
        if name == 'plain':
          expected = w0 - step(6 * u)
        elif name == 'keras_sgd' and id(variable) not in exempt:
          expected = w0 * (1 - lr * weight_decay) - step(3 * u)
        else:
          expected = w0 - step(3 * u)
        # Keras rounds the decay to float32; a second sum would be off by
        # lr * (1 + momentum) * 3 * unit, far above this.
        self.assertAllClose(replicas[0], expected, atol=1e-9, rtol=0,
                            msg=f'{name} {variable.path}')

  def test_ema_update_in_replica_context(self):
    strategy = distribute.get_strategy(RunConfig(strategy='mirrored'))
    with strategy.scope():
      student, ema_student = bn_model(0, 'student'), bn_model(5, 'ema')
    # Distinct moving statistics, so that the EMA visibly covers them.
    for variable in batch_norm_statistics(student):
      variable.assign(variable + 0.5)
    before, weights = values(ema_student.weights), values(student.weights)
    step = tf.constant(8, tf.int64)
    tf.function(lambda: strategy.run(
        lambda: ema.update(ema_student, student,
                           ema.decay_at(step, 0.995))))()
    decay = 9 / 18
    for variable, e, w in zip(ema_student.weights, before, weights):
      replicas = [np.array(v) for v in variable.value.values]
      self.assertAllEqual(replicas[0], replicas[1])
      self.assertAllClose(replicas[0], e - (1 - decay) * (e - w), atol=1e-12)


class ScheduleTest(tf.test.TestCase):

  def test_break_points_match_spec(self):
    total, warmup, wait, base = 300, 50, 30, 0.2
    for w, t in ((warmup, wait), (warmup, 0), (0, wait), (0, 0)):
      schedule = optim.WarmupCosine(base, total, w, t)
      steps = [0, max(t - 1, 0), t, t + max(w - 1, 0), t + w, (total + t) // 2,
               total - 1, total, total + 100]
      for step in steps:
        self.assertAllClose(float(schedule(step)),
                            spec_rate(step, base, total, w, t), atol=1e-7,
                            msg=f'warmup={w} wait={t} step={step}')
    schedule = optim.WarmupCosine(base, total, warmup, wait)
    self.assertEqual(float(schedule(wait - 1)), 0.0)
    self.assertAllClose(float(schedule(wait)), base / warmup)
    self.assertAllClose(float(schedule(wait + warmup - 1)), base)
    self.assertAllClose(float(schedule(wait + warmup)), base)
    self.assertAllClose(float(schedule(total)), 0.0, atol=1e-9)
    self.assertAllClose(float(schedule(total + 100)), 0.0, atol=1e-9)

  def test_learning_rates_scale_by_labeled_batch(self):
    config = OptimConfig(labeled_batch_size=128, num_steps=300,
                         teacher_lr=0.05, student_lr=0.05,
                         scale_lr_by_batch=True, teacher_warmup_steps=50,
                         student_wait_steps=30, student_warmup_steps=50)
    teacher, student = optim.learning_rates(config)
    for step in (0, 29, 30, 49, 50, 79, 80, 200, 300):
      self.assertAllClose(float(teacher(step)),
                          spec_rate(step, 0.025, 300, 50), atol=1e-8)
      self.assertAllClose(float(student(step)),
                          spec_rate(step, 0.025, 300, 50, 30), atol=1e-8)
    unscaled, _ = optim.learning_rates(
        OptimConfig(labeled_batch_size=128, num_steps=300))
    self.assertAllClose(float(unscaled(150)), spec_rate(150, 0.05, 300))

  def test_rate_follows_the_optimizers_own_iterations(self):
    schedule = optim.WarmupCosine(BASE, TOTAL, WARMUP, WAIT)
    optimizer = optim.Tf1Momentum(schedule, 0.9)
    variable = keras.Variable(np.zeros(2), dtype='float64')
    for step in range(6):
      self.assertAllClose(float(optimizer.learning_rate),
                          spec_rate(step, BASE, TOTAL, WARMUP, WAIT))
      optimizer.apply_gradients([(tf.ones(2, tf.float64), variable)])


class WeightDecayTest(tf.test.TestCase):

  def test_decay_and_clip_exempts_batch_norm_only(self):
    model = bn_model()
    variables = model.trainable_variables
    exempt = normalization_weights(model)
    self.assertLen(exempt, 2)  # gamma, beta
    zeros = [tf.zeros_like(v) for v in variables]
    decayed, norm = optim.decay_and_clip(zeros, variables, exempt, 0.1, 1e9)
    decayed_norm_sq = 0.0
    for grad, variable in zip(decayed, variables):
      if any(variable is e for e in exempt):
        self.assertAllEqual(grad, np.zeros(variable.shape))
      else:
        # Kernels and biases (the classifier bias included): g + wd * w.
        self.assertAllClose(grad, 0.1 * variable.numpy())
        self.assertGreater(float(tf.norm(grad)), 0)
        decayed_norm_sq += float(tf.reduce_sum(grad ** 2))
    self.assertAllClose(float(norm), math.sqrt(decayed_norm_sq))
    dense_bias = model.layers[-1].bias
    self.assertNotIn(id(dense_bias), [id(e) for e in exempt])

  def test_clip_by_global_norm_after_decay(self):
    model = bn_model()
    variables = model.trainable_variables
    grads = [tf.fill(v.shape, tf.constant(2.0, tf.float64)) for v in variables]
    raw_norm = math.sqrt(sum(4.0 * int(np.prod(v.shape)) for v in variables))
    clipped, norm = optim.decay_and_clip(grads, variables, [], 0.0, 1.0)
    self.assertAllClose(float(norm), raw_norm)
    self.assertAllClose(float(tf.linalg.global_norm(clipped)), 1.0)
    for grad, raw in zip(clipped, grads):
      self.assertAllClose(grad, raw / raw_norm)
    unclipped, _ = optim.decay_and_clip(grads, variables, [], 0.0, 1e9)
    self.assertAllClose(unclipped, grads)

  def test_optimizer_choice_decides_the_decay(self):
    tf1 = OptimConfig(optimizer='tf1_momentum', weight_decay=5e-4)
    sgd = OptimConfig(optimizer='keras_sgd', weight_decay=5e-4)
    self.assertEqual(optim.coupled_weight_decay(tf1), 5e-4)
    self.assertEqual(optim.coupled_weight_decay(sgd), 0.0)
    model = bn_model()
    self.assertIsInstance(optim.make_optimizer(0.1, tf1, 't', model=model),
                          optim.Tf1Momentum)
    keras_sgd = optim.make_optimizer(0.1, sgd, 's', model=model)
    self.assertIsInstance(keras_sgd, optim.SummedGradientsSGD)
    self.assertAllClose(keras_sgd.weight_decay, 5e-4)
    with self.assertRaisesRegex(ValueError, 'model='):
      optim.make_optimizer(0.1, sgd, 's')
    with self.assertRaisesRegex(ValueError, 'weight_decay'):
      optim.Tf1Momentum(0.1, weight_decay=1e-4)

  def _supervised_update(self, mode):
    """One SupervisedStep (lr 0.1, Nesterov 0.9, wd 0.05); returns w0, g, w1."""
    config = OptimConfig(optimizer=mode, momentum=0.9, nesterov=True,
                         weight_decay=0.05, teacher_lr=0.1)
    model = bn_model(name=mode)
    rng = np.random.default_rng(0)
    batch = {'labeled_images': tf.constant(rng.normal(size=(6, 4))),
             'labels': tf.constant(rng.integers(0, 3, 6), tf.int32)}
    start = values(model.trainable_variables)
    with tf.GradientTape() as tape:
      logits = model(batch['labeled_images'], training=True)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          batch['labels'], logits))
    grads = values(tape.gradient(loss, model.trainable_variables))
    step = SupervisedStep(
        model, optim.make_optimizer(0.1, config, mode, model=model), config,
        label_smoothing=0.0, global_batch=6)
    step(batch)
    exempt = {id(v) for v in normalization_weights(model)}
    decayed = [id(v) not in exempt for v in model.trainable_variables]
    return start, grads, values(model.trainable_variables), decayed

  def test_coupled_and_decoupled_decay_in_the_step(self):
    lr, mu, wd = 0.1, 0.9, 0.05
    for mode in ('tf1_momentum', 'keras_sgd'):
      start, grads, after, decayed = self._supervised_update(mode)
      for w0, g, w1, is_decayed in zip(start, grads, after, decayed):
        if mode == 'tf1_momentum':
          # Coupled: the decay rides in the gradient, momentum included.
          g = g + wd * w0 if is_decayed else g
          expected = w0 - lr * (1 + mu) * g
        else:
          # Decoupled: w <- w - lr * wd * w, and the gradient is bare.
          shrink = 1 - lr * wd if is_decayed else 1.0
          expected = w0 * shrink - lr * (1 + mu) * g
        self.assertAllClose(w1, expected, atol=1e-10, msg=mode)


class EmaTest(ListsCloseMixin, tf.test.TestCase):

  def test_decay_warm_up(self):
    for step, expected in ((0, 0.1), (1, 2 / 11), (8, 0.5), (100, 101 / 110),
                           (1790, 0.995), (5000, 0.995)):
      self.assertAllClose(float(ema.decay_at(step, 0.995)), expected)
    self.assertEqual(float(ema.decay_at(1000, 0.0)), 0.0)

  def test_update_covers_batch_norm_statistics(self):
    student, ema_student = bn_model(0, 'student'), bn_model(5, 'ema')
    student(tf.constant(np.random.default_rng(0).normal(size=(8, 4))),
            training=True)   # moves the moving mean and variance
    stats = {id(v) for v in batch_norm_statistics(ema_student)}
    self.assertLen(stats, 2)
    before, weights = values(ema_student.weights), values(student.weights)
    ema.update(ema_student, student, tf.constant(0.25))  # exact in float32
    covered = 0
    for variable, e, w in zip(ema_student.weights, before, weights):
      self.assertAllClose(variable.numpy(), e - 0.75 * (e - w), atol=1e-12)
      if id(variable) in stats:
        self.assertGreater(np.abs(variable.numpy() - e).max(), 1e-3)
        covered += 1
    self.assertEqual(covered, 2)
    ema.update(ema_student, student, ema.decay_at(0, 0.0))
    self.assertListsClose(values(ema_student.weights), weights, atol=1e-12)


# The released names' last parts (modeling_utils.conv2d, dense,
# sync_batch_norm), which Keras gives our variables too.
RELEASED_LEAF_NAMES = {'kernel', 'bias', 'gamma', 'beta', 'moving_mean',
                       'moving_variance'}


def released_start(name: str) -> float:
  """common_utils.setup_ema's get_init on a released variable name."""
  return 1.0 if any(k in name for k in ('variance', 'beta')) else 0.0


class EmaStartTest(tf.test.TestCase):
  """ema_init: the EMA's first value, by the released rule or a copy.

  The released rule is by name; ema.initialize picks batch-norm objects. The
  expected value of each variable here comes from the name rule applied to
  its leaf name, which is the released variable's (RELEASED_LEAF_NAMES).
  """

  def _check_released_start(self, student, ema_student, batch_norm_layers):
    before = values(student.weights)
    ema.initialize(ema_student, student, 'released_code')
    ones = 0
    for variable in ema_student.weights:
      leaf = variable.path.split('/')[-1]
      self.assertIn(leaf, RELEASED_LEAF_NAMES)
      expected = released_start(leaf)
      ones += expected == 1.0
      self.assertAllEqual(variable.numpy(),
                          np.full(variable.shape, expected), msg=variable.path)
    # beta and moving_variance of every batch-norm layer, nothing else.
    self.assertEqual(ones, 2 * batch_norm_layers)
    self.assertListsEqual(values(student.weights), before)

  def assertListsEqual(self, actual, expected):
    self.assertLen(actual, len(expected))
    for a, b in zip(actual, expected):
      self.assertAllEqual(a, b)

  def test_released_start_on_a_network_with_batch_norm(self):
    # bn_model's beta and gamma are random: neither 0 nor 1 by chance.
    student, ema_student = bn_model(0, 'student'), bn_model(5, 'ema')
    self._check_released_start(student, ema_student, batch_norm_layers=1)
    layer = [l for l in ema_student.layers
             if isinstance(l, keras.layers.BatchNormalization)][0]
    # Against the layer's own start (gamma 1, beta 0): the opposite.
    self.assertAllEqual(layer.gamma.numpy(), np.zeros(5))
    self.assertAllEqual(layer.beta.numpy(), np.ones(5))
    ema.initialize(ema_student, student, 'copy')
    self.assertListsEqual(values(ema_student.weights),
                          values(student.weights))

  def test_released_start_on_a_wide_resnet(self):
    config = ModelConfig(name='wrn-10-1')
    student = build_model(config, 10, 8, 'student')
    ema_student = build_model(config, 10, 8, 'ema_student')
    self._check_released_start(student, ema_student, batch_norm_layers=len(
        batch_norm_statistics(ema_student)) // 2)


if __name__ == '__main__':
  tf.test.main()
