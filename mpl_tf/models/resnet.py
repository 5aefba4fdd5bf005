"""ResNet-50 v1.5 as the released MPL code builds it (spec section 5.3).

Why not `keras.applications.ResNet50`: Keras 3.15's `residual_block_v1`
(keras/src/applications/resnet.py) puts the block's stride on the *first*
1x1 conv (the original v1 layout), while the released code, like most
modern ResNet-50s, strides the 3x3 conv (v1.5), which sees all of the
input instead of a quarter of it. Keras's version also differs in ways that
are not config fields one could edit: every conv has a bias, batch norm uses
epsilon 1.001e-5, and the stem and max-pool pad explicitly by 3 and 1 pixels
(where SAME pads by 2 and 3 on even-sized inputs, shifting the sampling
grid by one pixel). Moving the stride would mean rewriting all 16 blocks'
configs, so this file builds the network directly; it is short.

Layout: conv 7x7/2 (64) -> BN -> ReLU -> max-pool 3x3/2 (SAME); bottleneck
blocks [3, 4, 6, 3] with outputs 256/512/1024/2048 and bottlenecks a
quarter of that; block = conv1x1 -> BN -> ReLU -> conv3x3(stride) -> BN ->
ReLU -> conv1x1 -> BN, plus a conv1x1(stride) -> BN projection where the
stride or width changes, closed by ReLU(main + shortcut). No zero-init of
the last gamma. Head: global average pool -> dropout -> dense (no final BN).
"""

from typing import Sequence

import keras

from mpl_tf.config import ModelConfig
from mpl_tf.models.common import LayerMaker

RESNET50_BLOCKS = (3, 4, 6, 3)
STAGE_OUTPUTS = (256, 512, 1024, 2048)
BOTTLENECK_RATIO = 4


def _bottleneck(x, layers: LayerMaker, filters_out: int, stride: int,
                name: str):
  filters = filters_out // BOTTLENECK_RATIO
  main = layers.conv(filters, 1, 1, f'{name}_conv1')(x)
  main = layers.relu(f'{name}_relu1')(layers.batch_norm(f'{name}_bn1')(main))
  main = layers.conv(filters, 3, stride, f'{name}_conv2')(main)
  main = layers.relu(f'{name}_relu2')(layers.batch_norm(f'{name}_bn2')(main))
  main = layers.conv(filters_out, 1, 1, f'{name}_conv3')(main)
  main = layers.batch_norm(f'{name}_bn3')(main)
  if stride != 1 or x.shape[-1] != filters_out:
    shortcut = layers.conv(filters_out, 1, stride, f'{name}_shortcut')(x)
    shortcut = layers.batch_norm(f'{name}_shortcut_bn')(shortcut)
  else:
    shortcut = x
  return layers.relu(f'{name}_out')(layers.add(f'{name}_add')([main, shortcut]))


def resnet_v15(model_config: ModelConfig, num_classes: int, image_size: int,
               name: str,
               blocks: Sequence[int] = RESNET50_BLOCKS) -> keras.Model:
  """Builds a bottleneck ResNet v1.5; `blocks` = (3, 4, 6, 3) is ResNet-50.

  Returns a model from float32 images [N, size, size, 3] to float32 logits.
  """
  layers = LayerMaker(model_config)
  images = keras.Input((image_size, image_size, 3), name='images')
  x = layers.conv(64, 7, 2, 'stem_conv')(images)
  x = layers.relu('stem_relu')(layers.batch_norm('stem_bn')(x))
  x = keras.layers.MaxPooling2D(3, strides=2, padding='same',
                                dtype=layers.policy, name='stem_pool')(x)
  for stage, (num_blocks, filters_out) in enumerate(zip(blocks,
                                                        STAGE_OUTPUTS)):
    for block in range(num_blocks):
      stride = 2 if (stage > 0 and block == 0) else 1
      x = _bottleneck(x, layers, filters_out, stride,
                      f'stage{stage + 1}_block{block + 1}')
  logits = layers.classifier(x, num_classes, model_config.dropout_rate)
  return keras.Model(images, logits, name=name)
