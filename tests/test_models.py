"""WideResNet-28-2 as the released code builds it: size, shapes, layout."""

import keras
import numpy as np
import tensorflow as tf

from mpl_tf.config import ConfigError, ModelConfig
from mpl_tf.models import batch_norm_statistics, build_model, normalization_weights

# Zagoruyko's WRN-28-2 has 1,467,610 trainable parameters. The released
# code's stem has 32 channels instead of 16 (+432), so stage 1's first block
# takes 32 channels (+4,608 in its first conv, +32 in its first batch norm)
# and needs no 1x1 projection (-512): 1,467,610 + 4,560 = 1,472,170.
WRN_28_2_TRAINABLE = 1_472_170
WRN_28_2_BATCH_NORM_STATISTICS = 3_648


class WideResNetTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = build_model(ModelConfig(name='wrn-28-2'), 10, 32, 'student')

  def test_parameter_count_is_pinned(self):
    trainable = sum(int(np.prod(v.shape)) for v in self.model.trainable_weights)
    statistics = sum(int(np.prod(v.shape))
                     for v in batch_norm_statistics(self.model))
    self.assertEqual(trainable, WRN_28_2_TRAINABLE)
    self.assertEqual(statistics, WRN_28_2_BATCH_NORM_STATISTICS)
    self.assertEqual(self.model.count_params(),
                     WRN_28_2_TRAINABLE + WRN_28_2_BATCH_NORM_STATISTICS)

  def test_output_is_float32_logits(self):
    logits = self.model(tf.zeros([2, 32, 32, 3]), training=False)
    self.assertEqual(logits.shape, (2, 10))
    self.assertEqual(logits.dtype, tf.float32)

  def test_released_code_layout(self):
    convs = [l for l in self.model.layers if isinstance(l, keras.layers.Conv2D)]
    self.assertEqual(convs[0].filters, 32)              # 32-channel stem
    self.assertFalse(any(c.use_bias for c in convs))
    # Projections only where the shape changes: stages 2 and 3, block 1.
    projections = [c.name for c in convs if c.kernel_size == (1, 1)]
    self.assertEqual(projections, ['stage2_block1_shortcut',
                                   'stage3_block1_shortcut'])
    activations = [l for l in self.model.layers
                   if isinstance(l, keras.layers.LeakyReLU)]
    self.assertTrue(all(abs(a.negative_slope - 0.2) < 1e-9 for a in activations))
    dropouts = [l for l in self.model.layers
                if isinstance(l, keras.layers.Dropout)]
    self.assertLen(dropouts, 1)                         # before the classifier
    dense = self.model.get_layer('head_dense')
    self.assertLessEqual(float(tf.reduce_max(tf.abs(dense.kernel))),
                         1 / np.sqrt(10))
    bn = self.model.get_layer('head_bn')
    self.assertAllClose([bn.momentum, bn.epsilon], [0.99, 1e-3])
    # Weight decay exempts exactly the batch-norm gammas and betas.
    self.assertLen(normalization_weights(self.model), 2 * 25)

  def test_unknown_name_is_a_config_error(self):
    with self.assertRaisesRegex(ConfigError, 'wrn-<depth>-<width>'):
      build_model(ModelConfig(name='resnet-9000'), 10, 32, 'x')
    with self.assertRaisesRegex(ConfigError, '6n\\+4'):
      build_model(ModelConfig(name='wrn-27-2'), 10, 32, 'x')
