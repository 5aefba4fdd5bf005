"""WideResNet-28-k as the released MPL code builds it (spec section 5.2).

Differences from Zagoruyko & Komodakis's WRN, all taken from the released code:
the stem has 16k channels (32 for k=2, not 16), so the first block of stage 1
has no projection; every activation is a leaky ReLU with slope 0.2; blocks
are pre-activation, and the projection shortcut reads the *activated* output
of the block's first batch norm; dropout sits only before the classifier;
convolutions have no bias and He-normal fan-out initialisation (untruncated);
the classifier's kernel is U(-1/sqrt(K), 1/sqrt(K)) with K the number of
classes.
"""

import math

import keras

LEAKY_SLOPE = 0.2


def _conv(filters: int, kernel: int, stride: int, name: str):
  return keras.layers.Conv2D(
      filters, kernel, strides=stride, padding='same', use_bias=False,
      kernel_initializer=keras.initializers.VarianceScaling(
          scale=2.0, mode='fan_out', distribution='untruncated_normal'),
      name=name)


def _batch_norm(momentum: float, epsilon: float, name: str):
  return keras.layers.BatchNormalization(
      momentum=momentum, epsilon=epsilon, name=name)


def _activation(name: str):
  return keras.layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=name)


def _block(x, filters: int, stride: int, bn_args: dict, name: str):
  """Pre-activation block: BN-lrelu-conv-BN-lrelu-conv plus the shortcut."""
  activated = _activation(f'{name}_act1')(
      _batch_norm(name=f'{name}_bn1', **bn_args)(x))
  main = _conv(filters, 3, stride, f'{name}_conv1')(activated)
  main = _batch_norm(name=f'{name}_bn2', **bn_args)(main)
  main = _activation(f'{name}_act2')(main)
  main = _conv(filters, 3, 1, f'{name}_conv2')(main)
  if stride != 1 or x.shape[-1] != filters:
    shortcut = _conv(filters, 1, stride, f'{name}_shortcut')(activated)
  else:
    shortcut = x
  return keras.layers.Add(name=f'{name}_add')([main, shortcut])


def wide_resnet(depth: int = 28, width: int = 2, num_classes: int = 10,
                image_size: int = 32, dropout_rate: float = 0.0,
                batch_norm_momentum: float = 0.99,
                batch_norm_epsilon: float = 1e-3,
                name: str = 'wide_resnet') -> keras.Model:
  """Builds WRN-depth-width; returns float32 logits of shape [N, classes]."""
  if (depth - 4) % 6:
    raise ValueError(f'WRN depth must be 6n+4 (e.g. 28), got {depth}.')
  blocks_per_stage = (depth - 4) // 6
  widths = [16 * width, 32 * width, 64 * width]
  bn_args = dict(momentum=batch_norm_momentum, epsilon=batch_norm_epsilon)

  images = keras.Input((image_size, image_size, 3), name='images')
  x = _conv(16 * width, 3, 1, 'stem')(images)
  for stage, filters in enumerate(widths):
    for block in range(blocks_per_stage):
      stride = 2 if (stage > 0 and block == 0) else 1
      x = _block(x, filters, stride, bn_args, f'stage{stage + 1}_block{block + 1}')
  x = _batch_norm(name='head_bn', **bn_args)(x)
  x = _activation('head_act')(x)
  x = keras.layers.GlobalAveragePooling2D(name='head_pool')(x)
  x = keras.layers.Dropout(dropout_rate, name='head_dropout')(x)
  limit = 1.0 / math.sqrt(num_classes)
  logits = keras.layers.Dense(
      num_classes,
      kernel_initializer=keras.initializers.RandomUniform(-limit, limit),
      bias_initializer='zeros', name='head_dense')(x)
  logits = keras.layers.Activation('linear', dtype='float32',
                                   name='logits')(logits)
  return keras.Model(images, logits, name=name)
