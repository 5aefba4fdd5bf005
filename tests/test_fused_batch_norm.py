"""FusedBatchNormalization against Keras 3's BatchNormalization and numpy.

One layer of each kind with identical weights on the same batches: outputs,
gradients (input, gamma, beta) and moving statistics, training and
inference, float32 and the mixed policies; the kernel it really runs
(FusedBatchNormV3 in the graph); where it falls back to Keras's path;
checkpoints across the two classes; restoring statistics after a pass.
Tolerances (values of order 1): outputs and input gradients one unit in
the last place of the compute precision (1e-5 in float32; both layers
compute in float32 and round once), gamma and beta gradients 1e-5 relative
plus 1e-4 absolute, moving statistics 1e-5 relative plus 1e-6 absolute.
"""

import os

from absl import flags as absl_flags
import keras
import numpy as np
import tensorflow as tf

from flags import definitions
from mpl_tf import config_checks
from mpl_tf.config import Config, ConfigError, ModelConfig
from mpl_tf.models import (batch_norm_statistics, build_model,
                           restored_afterwards)
from mpl_tf.models.fused_batch_norm import FusedBatchNormalization

MOMENTUM, EPSILON, CHANNELS = 0.7, 1e-3, 3
# One unit in the last place at magnitude 4 (|y| < 4 here).
ULP_AT_4 = {'float32': 1e-5, 'mixed_bfloat16': 2.0 ** -6,
            'mixed_float16': 2.0 ** -9}


def _batch(seed: int, shape=(4, 5, 5, CHANNELS)) -> np.ndarray:
  """Per-channel means far from 0 and unequal variances."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * [0.5, 1.0, 2.0][:shape[-1]] +
          [1.0, -2.0, 3.0][:shape[-1]]).astype(np.float32)


def _pair(dtype: str = 'float32', shape=(None, 5, 5, CHANNELS), **kwargs):
  """(Keras's layer, the fused layer), built with the same random weights."""
  kwargs = {'momentum': MOMENTUM, 'epsilon': EPSILON, 'dtype': dtype,
            **kwargs}
  keras_layer = keras.layers.BatchNormalization(**kwargs)
  fused_layer = FusedBatchNormalization(**kwargs)
  rng = np.random.default_rng(7)
  weights = [rng.uniform(0.5, 1.5, CHANNELS), rng.normal(size=CHANNELS),
             rng.normal(size=CHANNELS), rng.uniform(0.5, 2.0, CHANNELS)]
  for layer in (keras_layer, fused_layer):
    layer.build(shape)
    layer.set_weights(weights)
  return keras_layer, fused_layer


def _call(layer, x: np.ndarray, training: bool):
  """(output, d/dx, d/dgamma, d/dbeta) of sum(y * w) for a fixed random w."""
  x = tf.cast(x, layer.compute_dtype)
  w = tf.constant(np.random.default_rng(3).normal(size=x.shape), tf.float32)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x, training=training)
    loss = tf.reduce_sum(tf.cast(y, tf.float32) * w)
  grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
  return [tf.cast(t, tf.float32).numpy() for t in [y] + grads]


def _statistics(layer):
  return [layer.moving_mean.numpy(), layer.moving_variance.numpy()]


def _ops(layer, x: np.ndarray, training: bool) -> set:
  """The op types of `layer`'s training or inference call, traced."""
  function = tf.function(lambda x: layer(x, training=training))
  graph = function.get_concrete_function(
      tf.TensorSpec(x.shape, layer.compute_dtype)).graph
  return {op.type for op in graph.get_operations()}


class SameAsKerasTest(tf.test.TestCase):

  def _assert_same(self, dtype: str, training: bool, calls: int = 2):
    keras_layer, fused_layer = _pair(dtype)
    ulp = ULP_AT_4[dtype]
    for seed in range(calls):
      x = _batch(seed)
      (y, dx, dgamma, dbeta), (fy, fdx, fdgamma, fdbeta) = (
          _call(keras_layer, x, training), _call(fused_layer, x, training))
      msg = f'{dtype} training={training} call {seed}'
      self.assertAllClose(fy, y, rtol=0, atol=ulp, msg=msg)
      self.assertAllClose(fdx, dx, rtol=0, atol=ulp, msg=msg)
      self.assertAllClose(fdgamma, dgamma, rtol=1e-5, atol=1e-4, msg=msg)
      self.assertAllClose(fdbeta, dbeta, rtol=1e-5, atol=1e-4, msg=msg)
      self.assertAllClose(_statistics(fused_layer), _statistics(keras_layer),
                          rtol=1e-5, atol=1e-6, msg=msg)
    return keras_layer, fused_layer

  def test_training_float32(self):
    self._assert_same('float32', training=True)

  def test_training_mixed_bfloat16(self):
    self._assert_same('mixed_bfloat16', training=True)

  def test_training_mixed_float16(self):
    self._assert_same('mixed_float16', training=True)

  def test_inference_every_precision(self):
    for dtype in ULP_AT_4:
      before = _statistics(_pair(dtype)[1])
      _, fused_layer = self._assert_same(dtype, training=False)
      # Inference leaves the moving statistics as they were set.
      self.assertAllEqual(_statistics(fused_layer), before)

  def test_moving_statistics_are_the_biased_momentum_average(self):
    # numpy, independently of both layers: after two training calls.
    _, fused_layer = _pair()
    mean, variance = _statistics(fused_layer)
    for seed in range(2):
      x = _batch(seed).astype(np.float64)
      _call(fused_layer, x, training=True)
      mean = mean * MOMENTUM + x.mean(axis=(0, 1, 2)) * (1 - MOMENTUM)
      variance = (variance * MOMENTUM +
                  x.var(axis=(0, 1, 2), ddof=0) * (1 - MOMENTUM))
    self.assertAllClose(_statistics(fused_layer), [mean, variance],
                        rtol=1e-5, atol=1e-6)

  def test_compiled_with_xla_as_keras(self):
    # XLA (jit_compile, every TPU step) lowers the op itself, with its own
    # variance correction.
    keras_layer, fused_layer = _pair()
    x = _batch(0)
    y = _call(keras_layer, x, training=True)[0]
    compiled = tf.function(lambda x: fused_layer(x, training=True),
                           jit_compile=True)
    self.assertAllClose(compiled(x), y, atol=1e-5)
    self.assertAllClose(_statistics(fused_layer), _statistics(keras_layer),
                        rtol=1e-5, atol=1e-6)

  def test_untrainable_layer_runs_inference_in_training(self):
    keras_layer, fused_layer = _pair()
    for layer in (keras_layer, fused_layer):
      layer.trainable = False
    before = _statistics(fused_layer)
    x = _batch(0)
    self.assertAllClose(_call(fused_layer, x, True)[0],
                        _call(keras_layer, x, True)[0], atol=1e-5)
    self.assertAllClose(_statistics(fused_layer), before)


class KernelTest(tf.test.TestCase):
  """Which ops run, and where Keras's path is kept."""

  def test_fused_kernel_in_training_and_inference(self):
    keras_layer, fused_layer = _pair()
    x = _batch(0)
    for training in (True, False):
      self.assertIn('FusedBatchNormV3', _ops(fused_layer, x, training))
      self.assertNotIn('FusedBatchNormV3', _ops(keras_layer, x, training))
    # The moments are not computed a second time around it.
    self.assertNotIn('SquaredDifference', _ops(fused_layer, x, True))

  def test_synchronized_over_one_replica_is_fused(self):
    # No strategy (the default replica context): Keras's synchronized
    # moments sum over this one replica only.
    _, fused_layer = _pair(synchronized=True)
    self.assertIn('FusedBatchNormV3', _ops(fused_layer, _batch(0), True))

  def test_synchronized_over_two_replicas_keeps_keras_path(self):
    from mpl_tf import distribute  # pylint: disable=g-import-not-at-top
    from mpl_tf.config import RunConfig  # pylint: disable=g-import-not-at-top
    strategy = distribute.get_strategy(RunConfig(strategy='mirrored'))
    self.assertEqual(strategy.num_replicas_in_sync, 2)
    with strategy.scope():
      layer = FusedBatchNormalization(synchronized=True)
      layer.build((None, 5, 5, CHANNELS))
    x = tf.constant(_batch(0))
    graph = tf.function(lambda x: strategy.run(
        lambda y: layer(y, training=True), args=(x,))
                        ).get_concrete_function(x).graph
    ops = {op.type for op in graph.get_operations()}
    self.assertNotIn('FusedBatchNormV3', ops)
    self.assertIn('CollectiveReduceV2', ops)  # Keras's sums of x and x^2.

  def test_other_inputs_take_keras_path_with_keras_numbers(self):
    rng = np.random.default_rng(0)
    cases = [('2-D input', {'shape': (None, CHANNELS)},
              rng.normal(size=(6, CHANNELS)), 'float32'),
             ('float64', {}, _batch(0), 'float64'),
             ('epsilon below cuDNN', {'epsilon': 1e-6}, _batch(0), 'float32')]
    for what, kwargs, x, dtype in cases:
      keras_layer, fused_layer = _pair(dtype, **kwargs)
      x = x.astype(dtype)
      self.assertNotIn('FusedBatchNormV3', _ops(fused_layer, x, True), what)
      self.assertAllClose(_call(fused_layer, x, True),
                          _call(keras_layer, x, True), msg=what)
      self.assertAllClose(_statistics(fused_layer), _statistics(keras_layer))

  def test_a_mask_is_refused_naming_the_fix(self):
    _, fused_layer = _pair()
    with self.assertRaisesRegex(ValueError, 'batch_norm_kernel=keras'):
      fused_layer(_batch(0), training=True,
                  mask=tf.ones([4, 5, 5], tf.bool))


class NetworksTest(tf.test.TestCase):
  """The config field chooses the class of every network's batch norm."""

  def test_field_chooses_the_class_and_counts_are_unchanged(self):
    for name, size in (('wrn-10-1', 8), ('efficientnet-b0', 32)):
      models = {kernel: build_model(ModelConfig(
          name=name, batch_norm_kernel=kernel), 10, size, kernel)
                for kernel in ('fused', 'keras')}
      for kernel, cls in (('fused', FusedBatchNormalization),
                          ('keras', keras.layers.BatchNormalization)):
        kinds = {type(layer) for layer in models[kernel]._flatten_layers()  # pylint: disable=protected-access
                 if isinstance(layer, keras.layers.BatchNormalization)}
        self.assertEqual(kinds, {cls}, f'{name} {kernel}')
      self.assertEqual(
          [w.shape for w in models['fused'].weights],
          [w.shape for w in models['keras'].weights], name)
    self.assertEqual(ModelConfig().batch_norm_kernel, 'fused')

  def test_unknown_kernel_is_refused_and_flag_reads(self):
    with self.assertRaisesRegex(ConfigError, 'batch_norm_kernel=.cudnn.'):
      config_checks.validate(Config(model=ModelConfig(
          batch_norm_kernel='cudnn')))
    flag_values = absl_flags.FlagValues()
    definitions.define(flag_values)
    flag_values(['test', '--batch_norm_kernel=keras'])
    self.assertEqual(definitions.to_config(flag_values).model
                     .batch_norm_kernel, 'keras')

  def test_checkpoints_load_across_the_two_classes(self):
    x = _batch(0, (2, 8, 8, 3))
    for written, read in (('keras', 'fused'), ('fused', 'keras')):
      source = build_model(ModelConfig(name='wrn-10-1', dropout_rate=0.0,
                                       batch_norm_kernel=written), 10, 8, 'a')
      source(x, training=True)  # Moving statistics away from 0 and 1.
      path = tf.train.Checkpoint(model=source).write(
          os.path.join(self.get_temp_dir(), written))
      target = build_model(ModelConfig(name='wrn-10-1', dropout_rate=0.0,
                                       batch_norm_kernel=read), 10, 8, 'b')
      tf.train.Checkpoint(model=target).read(path).assert_consumed()
      for a, b in zip(source.weights, target.weights):
        self.assertAllEqual(a.numpy(), b.numpy(), a.path)
      self.assertAllClose(target(x, training=False),
                          source(x, training=False), atol=1e-5)

  def test_statistics_restored_after_a_traced_pass(self):
    model = build_model(ModelConfig(name='wrn-10-1'), 10, 8, 'restored')
    statistics = batch_norm_statistics(model)
    before = [v.numpy() for v in statistics]

    @tf.function
    def measured_pass(x):
      with restored_afterwards(statistics):
        return model(x, training=True)

    measured_pass(_batch(1, (2, 8, 8, 3)))
    for old, new in zip(before, statistics):
      self.assertAllEqual(old, new.numpy())
    # The control: a training call outside the block moves them.
    tf.function(lambda x: model(x, training=True))(_batch(1, (2, 8, 8, 3)))
    self.assertNotAllClose(before[0], statistics[0].numpy())
