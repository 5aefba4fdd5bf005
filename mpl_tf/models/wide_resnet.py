"""WideResNet-28-k as the released MPL code builds it (spec section 5.2).

Differences from Zagoruyko & Komodakis's WRN, all taken from the released code:
the stem has 16k channels (32 for k=2, not 16), so the first block of stage 1
has no projection; every activation is a leaky ReLU with slope 0.2; blocks
are pre-activation, and the projection shortcut reads the *activated* output
of the block's first batch norm; dropout sits only before the classifier;
convolutions have no bias and He-normal fan-out initialisation (untruncated);
the classifier's kernel is U(-1/sqrt(K), 1/sqrt(K)) with K the number of
classes.

The released code's `wrn-28-large` is the one exception to "stem = 16k": it
is Wrn28k with k=135 and widths [16, 135, 270, 540], i.e. a 16-channel stem
(so block 1 *does* project) and stages of 135, 270 and 540 channels.
"""

from typing import Sequence

import keras

from mpl_tf.config import ModelConfig
from mpl_tf.models.common import LayerMaker

LEAKY_SLOPE = 0.2
# The released code's `wrn-28-large` (Wrn28k with k=135).
LARGE_STEM_FILTERS = 16
LARGE_WIDTHS = (135, 270, 540)


def _block(x, layers: LayerMaker, filters: int, stride: int, name: str):
  """Pre-activation block: BN-lrelu-conv-BN-lrelu-conv plus the shortcut."""
  activated = layers.leaky_relu(LEAKY_SLOPE, f'{name}_act1')(
      layers.batch_norm(f'{name}_bn1')(x))
  main = layers.conv(filters, 3, stride, f'{name}_conv1')(activated)
  main = layers.batch_norm(f'{name}_bn2')(main)
  main = layers.leaky_relu(LEAKY_SLOPE, f'{name}_act2')(main)
  main = layers.conv(filters, 3, 1, f'{name}_conv2')(main)
  if stride != 1 or x.shape[-1] != filters:
    shortcut = layers.conv(filters, 1, stride, f'{name}_shortcut')(activated)
  else:
    shortcut = x
  return layers.add(f'{name}_add')([main, shortcut])


def wide_resnet(model_config: ModelConfig, depth: int, stem_filters: int,
                widths: Sequence[int], num_classes: int, image_size: int,
                name: str) -> keras.Model:
  """Builds a WRN of `depth` layers; returns float32 logits [N, classes].

  Args:
    model_config: dropout, batch-norm and precision settings.
    depth: 6n+4 (n blocks per stage); 28 in the paper.
    stem_filters: channels of the 3x3 stem (16k in the released code).
    widths: channels of the three stages (16k, 32k, 64k).
    num_classes, image_size, name: as in `mpl_tf.models.build_model`.
  """
  if (depth - 4) % 6:
    raise ValueError(f'WRN depth must be 6n+4 (e.g. 28), got {depth}.')
  blocks_per_stage = (depth - 4) // 6
  layers = LayerMaker(model_config)

  images = keras.Input((image_size, image_size, 3), name='images')
  x = layers.conv(stem_filters, 3, 1, 'stem')(images)
  for stage, filters in enumerate(widths):
    for block in range(blocks_per_stage):
      stride = 2 if (stage > 0 and block == 0) else 1
      x = _block(x, layers, filters, stride,
                 f'stage{stage + 1}_block{block + 1}')
  x = layers.batch_norm('head_bn')(x)
  x = layers.leaky_relu(LEAKY_SLOPE, 'head_act')(x)
  logits = layers.classifier(x, num_classes, model_config.dropout_rate)
  return keras.Model(images, logits, name=name)
