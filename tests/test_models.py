"""Every network by name: sizes, shapes, layouts, round trips, sync BN, bf16.

Kept cheap for a 2-core CI machine: the real networks are built at most
once per configuration (`_model` caches the ones no test trains), forward
passes use batches of 1-4, and the giant EfficientNets are only counted,
never allocated (`count_parameters` builds them without weights).
"""

import functools
import os

import keras
from keras.src.backend.common import global_state
import numpy as np
import tensorflow as tf

from mpl_tf import distribute
from mpl_tf import optim
from mpl_tf.config import (ConfigError, ModelConfig, MplConfig, OptimConfig,
                           RunConfig)
from mpl_tf.models import (batch_norm_statistics, build_model,
                           count_parameters, normalization_weights,
                           without_weights)
from mpl_tf.models import efficientnet
from mpl_tf.mpl_step import MplStep

# Zagoruyko's WRN-28-2 has 1,467,610 trainable parameters. The released
# code's stem has 32 channels instead of 16 (+432), so stage 1's first block
# takes 32 channels (+4,608 in its first conv, +32 in its first batch norm)
# and needs no 1x1 projection (-512): 1,467,610 + 4,560 = 1,472,170.
WRN_28_2_TRAINABLE = 1_472_170
WRN_28_2_BATCH_NORM_STATISTICS = 3_648
# (trainable, batch-norm statistics), exact; docs/models.md explains each
# against the paper. Classes: 10 for the WRNs, 1,000 for the rest.
PINNED_COUNTS = {
    'wrn-28-10': (36_688_170, 18_240),          # Zagoruyko: 36.5M
    'wrn-28-large': (25_976_769, 15_152),       # released code only
    'resnet-50': (25_557_032, 53_120),          # paper: 25.6M (26M)
    'efficientnet-b0': (5_288_548, 42_016),     # Tan & Le: 5.3M
    'efficientnet-b6-mpl': (316_649_180, 626_720),  # paper: 390M, see docs
    'efficientnet-l2': (480_309_308, 1_090_688),    # paper: 480M
}
# One network of each family that the tests share (and never train).
ONE_OF_EACH_FAMILY = (
    ('wrn-10-1', 10, 32, {}),
    ('resnet-50', 1000, 224, {}),
    ('efficientnet-b0', 10, 32, {'stochastic_depth_rate': 0.2}),
)


def _size(variables) -> int:
  return sum(int(np.prod(v.shape)) for v in variables)


@functools.lru_cache(maxsize=None)
def _model(name: str, num_classes: int, image_size: int,
           **fields) -> keras.Model:
  """A built network that tests only read (never train): built once."""
  return build_model(ModelConfig(name=name, **fields), num_classes,
                     image_size, 'student')


def _images(batch: int, size: int, seed: int = 0) -> tf.Tensor:
  rng = np.random.default_rng(seed)
  return tf.constant(rng.normal(1.0, 2.0, (batch, size, size, 3)), tf.float32)


def _layers_of(model, kind):
  return [l for l in model.layers if isinstance(l, kind)]


def _variables_queued_for_initialisation() -> int:
  return len(global_state.get_global_attribute('uninitialized_variables',
                                               None) or [])


def _inference_function(model: keras.Model, size: int):
  return tf.function(
      lambda images: model(images, training=False), autograph=False,
      input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])


class WideResNetTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = _model('wrn-28-2', 10, 32)

  def test_parameter_count_is_pinned(self):
    trainable = _size(self.model.trainable_weights)
    statistics = _size(batch_norm_statistics(self.model))
    self.assertEqual(trainable, WRN_28_2_TRAINABLE)
    self.assertEqual(statistics, WRN_28_2_BATCH_NORM_STATISTICS)
    self.assertEqual(self.model.count_params(),
                     WRN_28_2_TRAINABLE + WRN_28_2_BATCH_NORM_STATISTICS)

  def test_output_is_float32_logits(self):
    logits = self.model(tf.zeros([2, 32, 32, 3]), training=False)
    self.assertEqual(logits.shape, (2, 10))
    self.assertEqual(logits.dtype, tf.float32)

  def test_released_code_layout(self):
    convs = _layers_of(self.model, keras.layers.Conv2D)
    self.assertEqual(convs[0].filters, 32)              # 32-channel stem
    self.assertFalse(any(c.use_bias for c in convs))
    # Projections only where the shape changes: stages 2 and 3, block 1.
    projections = [c.name for c in convs if c.kernel_size == (1, 1)]
    self.assertEqual(projections, ['stage2_block1_shortcut',
                                   'stage3_block1_shortcut'])
    activations = _layers_of(self.model, keras.layers.LeakyReLU)
    self.assertTrue(all(abs(a.negative_slope - 0.2) < 1e-9
                        for a in activations))
    dropouts = _layers_of(self.model, keras.layers.Dropout)
    self.assertLen(dropouts, 1)                         # before the classifier
    dense = self.model.get_layer('head_dense')
    self.assertLessEqual(float(tf.reduce_max(tf.abs(dense.kernel))),
                         1 / np.sqrt(10))
    bn = self.model.get_layer('head_bn')
    self.assertAllClose([bn.momentum, bn.epsilon], [0.99, 1e-3])
    # Weight decay exempts exactly the batch-norm gammas and betas.
    self.assertLen(normalization_weights(self.model), 2 * 25)

  def test_wrn_28_large_is_the_released_k135_layout(self):
    with without_weights():
      model = build_model(ModelConfig(name='wrn-28-large'), 10, 32, 'large')
    convs = _layers_of(model, keras.layers.Conv2D)
    self.assertEqual(convs[0].filters, 16)              # stem: 16, not 16k
    self.assertEqual([c.filters for c in convs if c.kernel_size == (1, 1)],
                     [135, 270, 540])                   # block 1 projects
    self.assertEqual(model.output.shape, (None, 10))

  def test_unknown_name_is_a_config_error(self):
    with self.assertRaisesRegex(ConfigError, 'wrn-<depth>-<width>.*resnet-50'
                                '.*efficientnet-b6-mpl'):
      build_model(ModelConfig(name='resnet-9000'), 10, 32, 'x')
    with self.assertRaisesRegex(ConfigError, '6n\\+4'):
      build_model(ModelConfig(name='wrn-27-2'), 10, 32, 'x')


class ResNet50Test(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = _model('resnet-50', 1000, 224)

  def test_parameter_count_and_shape_at_224(self):
    self.assertEqual(
        (_size(self.model.trainable_weights),
         _size(batch_norm_statistics(self.model))), PINNED_COUNTS['resnet-50'])
    logits = self.model(_images(1, 224), training=False)
    self.assertEqual((logits.shape, logits.dtype), ((1, 1000), tf.float32))

  def test_v1_5_layout_strides_the_3x3_conv(self):
    first_blocks = ('stage2_block1', 'stage3_block1', 'stage4_block1')
    for block in first_blocks:
      self.assertEqual(self.model.get_layer(f'{block}_conv1').strides, (1, 1))
      self.assertEqual(self.model.get_layer(f'{block}_conv2').strides, (2, 2))
      self.assertEqual(self.model.get_layer(f'{block}_shortcut').strides,
                       (2, 2))
    convs = _layers_of(self.model, keras.layers.Conv2D)
    self.assertFalse(any(c.use_bias for c in convs))
    self.assertTrue(all(c.padding == 'same' for c in convs))
    # 16 blocks; projections in the first block of each stage only.
    self.assertLen([c for c in convs if c.name.endswith('_shortcut')], 4)
    self.assertEqual(self.model.get_layer('stage4_block3_out').output.shape,
                     (None, 7, 7, 2048))


class EfficientNetTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.imagenet = _model('efficientnet-b0', 1000, 224)
    cls.cifar = _model('efficientnet-b0', 10, 32, stochastic_depth_rate=0.2)

  def test_parameter_count_and_shape_at_224(self):
    self.assertEqual(
        (_size(self.imagenet.trainable_weights),
         _size(batch_norm_statistics(self.imagenet))),
        PINNED_COUNTS['efficientnet-b0'])
    logits = self.imagenet(_images(1, 224), training=False)
    self.assertEqual((logits.shape, logits.dtype), ((1, 1000), tf.float32))

  def test_small_images_use_stride_one_where_the_released_code_uses_s(self):
    logits = self.cifar(_images(2, 32), training=False)
    self.assertEqual((logits.shape, logits.dtype), ((2, 10), tf.float32))
    for name in ('stem_conv', 'block2a_dwconv', 'block3a_dwconv'):
      self.assertEqual(self.cifar.get_layer(name).strides, (1, 1))
      self.assertEqual(self.imagenet.get_layer(name).strides, (2, 2))
    self.assertEqual([efficientnet.stem_stride(s) for s in (8, 64, 65, 224)],
                     [1, 1, 2, 2])
    # 32 -> 8 (as WRN-28-k) and 224 -> 7 before the head.
    self.assertEqual(self.cifar.get_layer('top_conv').output.shape[1:3], (8, 8))
    self.assertEqual(self.imagenet.get_layer('top_conv').output.shape[1:3],
                     (7, 7))

  def test_keras_model_edited_to_the_released_layout(self):
    model = self.cifar
    kinds = {type(l).__name__ for l in model.layers}
    self.assertNoCommonElements(
        kinds, {'Rescaling', 'Normalization', 'ZeroPadding2D'})
    convs = _layers_of(model, (keras.layers.Conv2D,
                               keras.layers.DepthwiseConv2D))
    self.assertLen([c for c in convs
                    if isinstance(c, keras.layers.DepthwiseConv2D)], 16)
    for layer in convs:
      initializer = (layer.depthwise_initializer
                     if isinstance(layer, keras.layers.DepthwiseConv2D)
                     else layer.kernel_initializer)
      self.assertEqual(initializer.distribution, 'untruncated_normal')
      self.assertEqual(layer.padding, 'same')
    for layer in _layers_of(model, keras.layers.BatchNormalization):
      self.assertAllClose([layer.momentum, layer.epsilon], [0.99, 1e-3])
    # Stochastic depth: rate * block_index / 16 on the 9 residual branches
    # of B0 (its blocks 1a, 2a, 3a, 4a, 5a, 6a and 7a change shape).
    drops = {l.name: l.rate for l in _layers_of(model, keras.layers.Dropout)}
    self.assertEqual(drops.pop('top_dropout'), 0.2)
    self.assertEqual(sorted(drops), ['block2b_drop', 'block3b_drop',
                                     'block4b_drop', 'block4c_drop',
                                     'block5b_drop', 'block5c_drop',
                                     'block6b_drop', 'block6c_drop',
                                     'block6d_drop'])
    self.assertAllClose(drops['block2b_drop'], 0.2 * 2 / 16)
    self.assertAllClose(drops['block6d_drop'], 0.2 * 14 / 16)
    # The released head: conv1x1 -> BN -> swish -> pool -> dropout -> dense.
    self.assertEqual([l.name for l in model.layers][-7:],
                     ['top_conv', 'top_bn', 'top_activation', 'avg_pool',
                      'top_dropout', 'predictions', 'logits'])


class GiantModelTest(tf.test.TestCase):
  """Counted from shapes, without allocating (docs/models.md)."""

  def test_counts_without_weights_are_pinned(self):
    queued = _variables_queued_for_initialisation()
    for name in ('efficientnet-b6-mpl', 'efficientnet-l2'):
      self.assertEqual(count_parameters(ModelConfig(name=name), 1000, 224),
                       PINNED_COUNTS[name], msg=name)
    # Nothing is left for Keras to initialise (1.9 GB for L2) later on.
    self.assertEqual(_variables_queued_for_initialisation(), queued)
    for name in ('wrn-28-10', 'wrn-28-large'):
      self.assertEqual(count_parameters(ModelConfig(name=name), 10, 32),
                       PINNED_COUNTS[name], msg=name)

  def test_counting_agrees_with_building(self):
    for name, num_classes, size in (('wrn-28-2', 10, 32),
                                    ('efficientnet-b0', 1000, 224)):
      model = _model(name, num_classes, size)
      self.assertEqual(
          count_parameters(ModelConfig(name=name), num_classes, size),
          (_size(model.trainable_weights),
           _size(model.weights) - _size(model.trainable_weights)))


class RoundTripTest(tf.test.TestCase):
  """get_config/from_config and SavedModel give the same outputs."""

  def test_config_round_trip(self):
    for name, num_classes, size, fields in ONE_OF_EACH_FAMILY:
      model = _model(name, num_classes, size, **fields)
      images = _images(1, size)
      clone = keras.Model.from_config(model.get_config())
      clone.set_weights(model.get_weights())
      self.assertEqual(clone.count_params(), model.count_params())
      self.assertAllClose(clone(images, training=False),
                          model(images, training=False), atol=1e-5, msg=name)

  def test_saved_model_round_trip(self):
    for name, num_classes, size, fields in ONE_OF_EACH_FAMILY:
      model = _model(name, num_classes, size, **fields)
      images = _images(1, size)
      # A module holding the variables and an inference function: what a
      # serving export saves. (Tracking the Keras model object instead makes
      # TF walk every layer, 4x slower for EfficientNet-B0.)
      module = tf.Module()
      module.variables_ = [v.value for v in model.weights]
      module.serve = _inference_function(model, size)
      path = os.path.join(self.get_temp_dir(), name)
      tf.saved_model.save(module, path)
      loaded = tf.saved_model.load(path)
      self.assertAllClose(loaded.serve(images), model(images, training=False),
                          atol=1e-5, msg=name)


class SyncBatchNormTest(tf.test.TestCase):
  """Two replicas with half the batch each equal one replica on all of it."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # The process-wide instance: two MirroredStrategy objects in one process
    # can abort each other's collectives (see mpl_tf/distribute.py).
    cls.strategy = distribute.get_strategy(RunConfig(strategy='mirrored'))

  def _one_training_call(self, sync: bool, replicas: int):
    config = ModelConfig(name='wrn-10-1', dropout_rate=0.0,
                         sync_batch_norm=sync)
    images = _images(4, 8)
    reference = _model('wrn-10-1', 10, 8)
    if replicas == 1:
      model = build_model(config, 10, 8, 'single')
      model.set_weights(reference.get_weights())
      logits = model(images, training=True)
    else:
      with self.strategy.scope():
        model = build_model(config, 10, 8, 'mirrored')
      model.set_weights(reference.get_weights())
      halves = self.strategy.experimental_distribute_values_from_function(
          lambda context: tf.split(images, 2)[context.replica_id_in_sync_group])
      logits = tf.function(lambda x: self.strategy.run(
          lambda y: model(y, training=True), args=(x,)))(halves)
      logits = tf.concat(self.strategy.experimental_local_results(logits), 0)
    return logits, [v.numpy() for v in batch_norm_statistics(model)]

  def test_two_replicas_match_one(self):
    self.assertEqual(self.strategy.num_replicas_in_sync, 2)
    logits, statistics = self._one_training_call(sync=True, replicas=2)
    # One replica with Keras's ordinary (two-pass) moments on all 4 images.
    single_logits, single_statistics = self._one_training_call(
        sync=False, replicas=1)
    self.assertAllClose(logits, single_logits, atol=1e-4)
    self.assertAllClose(statistics, single_statistics, atol=1e-5)
    # The control: per-replica statistics differ, so the test can fail.
    unsynced_logits, _ = self._one_training_call(sync=False, replicas=2)
    self.assertNotAllClose(unsynced_logits, single_logits, atol=1e-3)

  def test_every_family_syncs_every_batch_norm(self):
    for name, num_classes, size, fields in ONE_OF_EACH_FAMILY:
      layers = _layers_of(_model(name, num_classes, size, **fields),
                          keras.layers.BatchNormalization)
      self.assertTrue(all(l.synchronized for l in layers), name)
    with without_weights():
      model = build_model(
          ModelConfig(name='efficientnet-b0', sync_batch_norm=False), 10, 32,
          'unsynced')
    self.assertFalse(any(l.synchronized for l in _layers_of(
        model, keras.layers.BatchNormalization)))


class MixedPrecisionTest(tf.test.TestCase):

  def test_bfloat16_compute_with_float32_logits_and_variables(self):
    images = _images(2, 32)
    for name in ('wrn-10-1', 'resnet-50', 'efficientnet-b0'):
      config = ModelConfig(name=name, precision='mixed_bfloat16')
      if name == 'resnet-50':  # Same layer helpers as WRN: layout only.
        with without_weights():
          model = build_model(config, 10, 32, 'bf16')
        self.assertEqual(model.output.dtype, 'float32')
      else:
        model = build_model(config, 10, 32, 'bf16')
        self.assertEqual(model(images, training=True).dtype, tf.float32, name)
      self.assertEqual({v.dtype for v in model.weights}, {'float32'}, name)
      for layer in model.layers[1:]:
        expected = 'float32' if layer.name == 'logits' else 'mixed_bfloat16'
        self.assertEqual(layer.dtype_policy.name, expected, layer.name)
      # Keras upcasts batch norm's input to float32 and keeps its statistics
      # in float32; only the output returns to bfloat16.
      bn = _layers_of(model, keras.layers.BatchNormalization)[0]
      self.assertEqual(bn.moving_variance.dtype, 'float32')
      self.assertEqual(bn.compute_dtype, 'bfloat16')
    # The per-layer policy never touches Keras's global one.
    self.assertEqual(keras.config.dtype_policy().name, 'float32')


class WeightDecayExemptionTest(tf.test.TestCase):

  def test_exactly_batch_norm_gammas_and_betas_are_exempt(self):
    for name, num_classes, size, fields in ONE_OF_EACH_FAMILY:
      model = _model(name, num_classes, size, **fields)
      batch_norms = _layers_of(model, keras.layers.BatchNormalization)
      expected = {id(w) for l in batch_norms for w in (l.gamma, l.beta)}
      exempt = normalization_weights(model)
      self.assertEqual({id(w) for w in exempt}, expected, name)
      self.assertLen(exempt, 2 * len(batch_norms))
      # The EMA pairs `weights` by position: trainable weights plus the
      # batch-norm statistics, and no dropout seed state.
      self.assertEqual(
          len(model.weights),
          len(model.trainable_weights) + len(batch_norm_statistics(model)))


class TrainingTest(tf.test.TestCase):
  """The ImageNet families train (32 px, batch 2, eager to skip tracing)."""

  def test_one_mpl_step_with_efficientnet(self):
    # The Keras-built family, with stochastic depth and dropout seeds.
    rng = np.random.default_rng(1)
    batch = {'labeled_images': _images(2, 32, 1),
             'labels': tf.constant(rng.integers(0, 10, 2), tf.int32),
             'unlabeled_images_ori': _images(2, 32, 2),
             'unlabeled_images_aug': _images(2, 32, 3)}
    optim_config = OptimConfig()
    config = ModelConfig(name='efficientnet-b0', stochastic_depth_rate=0.2)
    teacher = build_model(config, 10, 32, 'teacher')
    student = build_model(config, 10, 32, 'student')
    step = MplStep(
        MplConfig(), optim_config, teacher, student,
        optim.make_optimizer(0.01, optim_config, 'teacher_optimizer'),
        optim.make_optimizer(0.01, optim_config, 'student_optimizer'),
        global_labeled_batch=2, global_unlabeled_batch=2)
    watched = (teacher.trainable_weights[0], student.trainable_weights[0],
               batch_norm_statistics(student)[0])
    before = [v.numpy() for v in watched]
    metrics, _ = step(batch)
    for old, new, what in zip(before, watched,
                              ('teacher', 'student', 'student BN')):
      self.assertNotAllClose(old, new.numpy(), msg=what)
    self.assertTrue(all(np.isfinite(float(v)) for v in metrics.values()))

  def test_resnet_forward_and_backward(self):
    model = build_model(ModelConfig(name='resnet-50'), 10, 32, 'student')
    with tf.GradientTape() as tape:
      logits = model(_images(2, 32), training=True)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          tf.constant([1, 2]), logits))
    grads = tape.gradient(loss, model.trainable_weights)
    self.assertLen(grads, len(model.trainable_weights))
    for grad in grads:
      self.assertIsNotNone(grad)
      self.assertTrue(bool(tf.reduce_all(tf.math.is_finite(grad))))
