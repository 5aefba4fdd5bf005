"""One builder by name for teacher and student (they share an architecture)."""

import re
from typing import List

import keras

from mpl_tf.config import ConfigError, ModelConfig
from mpl_tf.models.wide_resnet import wide_resnet

_WRN = re.compile(r'^wrn-(\d+)-(\d+)$')


def build_model(model_config: ModelConfig, num_classes: int, image_size: int,
                name: str) -> keras.Model:
  """Builds the network named by `model_config.name` (e.g. 'wrn-28-2')."""
  match = _WRN.match(model_config.name)
  if not match:
    raise ConfigError(f'model={model_config.name!r} is unknown; this version '
                      f'builds WideResNets named wrn-<depth>-<width>, e.g. '
                      f'wrn-28-2.')
  depth, width = int(match.group(1)), int(match.group(2))
  if (depth - 4) % 6:
    raise ConfigError(f'model={model_config.name!r}: WRN depth must be 6n+4 '
                      f'(10, 16, 22, 28, ...).')
  return wide_resnet(depth=depth, width=width, num_classes=num_classes,
                     image_size=image_size,
                     dropout_rate=model_config.dropout_rate,
                     batch_norm_momentum=model_config.batch_norm_momentum,
                     batch_norm_epsilon=model_config.batch_norm_epsilon,
                     name=name)


def batch_norm_statistics(model: keras.Model) -> List[keras.Variable]:
  """The moving mean and variance of every batch-norm layer, by object."""
  stats = []
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if isinstance(layer, keras.layers.BatchNormalization):
      stats.extend([layer.moving_mean, layer.moving_variance])
  return stats


def normalization_weights(model: keras.Model) -> List[keras.Variable]:
  """Trainable weights of normalisation layers (exempt from weight decay)."""
  weights = []
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if isinstance(layer, (keras.layers.BatchNormalization,
                          keras.layers.LayerNormalization)):
      weights.extend(layer.trainable_weights)
  return weights
