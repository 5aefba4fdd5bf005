"""Layers shared by the hand-built networks (WRN-28-k and ResNet-50).

They follow the released code's `modeling_utils` (spec section 5.1): convs
without bias, SAME padding and an *untruncated* He-normal kernel on fan-out;
the classifier's kernel is U(-1/sqrt(K), 1/sqrt(K)) with K the number of
classes (the dense layer's fan-out, not its fan-in); batch norm starts at
gamma=1, beta=0, mean 0, variance 1.

Every layer gets the model's own dtype policy instead of reading Keras's
global one, so building a bfloat16 teacher never changes how anything else
in the process is built. The logits are cast to float32 by a final linear
layer whose policy is always float32, because the losses and the MPL
feedback are computed in float32 (spec section 3.7).
"""

import contextlib
import math

import keras
# Keras keeps its queue of not-yet-initialised variables here (see
# `without_weights`); there is no public accessor.
from keras.src.backend.common import global_state

from mpl_tf.config import ModelConfig
from mpl_tf.models.fused_batch_norm import FusedBatchNormalization


def conv_initializer() -> keras.initializers.Initializer:
  """N(0, sqrt(2 / (k * k * out))), as the released code (not truncated)."""
  return keras.initializers.VarianceScaling(
      scale=2.0, mode='fan_out', distribution='untruncated_normal')


def dense_initializer(num_classes: int) -> keras.initializers.Initializer:
  limit = 1.0 / math.sqrt(num_classes)
  return keras.initializers.RandomUniform(-limit, limit)


def dtype_policy(model_config: ModelConfig) -> keras.DTypePolicy:
  """'float32', 'mixed_bfloat16' or 'mixed_float16' as a per-layer policy."""
  return keras.DTypePolicy(model_config.precision)


def batch_norm_kwargs(model_config: ModelConfig) -> dict:
  """Momentum, epsilon and cross-replica synchronisation from the config.

  `synchronized=True` makes Keras sum the per-replica sums of x and x^2 over
  the replicas of the current tf.distribute replica context, so every
  replica normalises with, and updates its moving statistics from, the
  global batch's mean and (biased) variance, as the released code's
  cross-replica batch norm does. Keras keeps batch norm's arithmetic and
  variables in float32 under mixed policies.
  """
  return dict(momentum=model_config.batch_norm_momentum,
              epsilon=model_config.batch_norm_epsilon,
              synchronized=model_config.sync_batch_norm)


def batch_norm_class(model_config: ModelConfig) -> type:
  """The batch-norm layer of `batch_norm_kernel` (both are Keras's class).

  'fused' is a subclass of keras.layers.BatchNormalization with the same
  variables and semantics on TensorFlow's fused kernel
  (fused_batch_norm.py); 'keras' is Keras's layer itself.
  """
  if model_config.batch_norm_kernel == 'fused':
    return FusedBatchNormalization
  return keras.layers.BatchNormalization


class LayerMaker:
  """Makes the layers of one network with its batch-norm and dtype settings."""

  def __init__(self, model_config: ModelConfig):
    self.policy = dtype_policy(model_config)
    self._batch_norm_kwargs = batch_norm_kwargs(model_config)
    self._batch_norm_class = batch_norm_class(model_config)

  def conv(self, filters: int, kernel: int, stride: int, name: str):
    return keras.layers.Conv2D(
        filters, kernel, strides=stride, padding='same', use_bias=False,
        kernel_initializer=conv_initializer(), dtype=self.policy, name=name)

  def batch_norm(self, name: str):
    return self._batch_norm_class(
        dtype=self.policy, name=name, **self._batch_norm_kwargs)

  def leaky_relu(self, slope: float, name: str):
    return keras.layers.LeakyReLU(negative_slope=slope, dtype=self.policy,
                                  name=name)

  def relu(self, name: str):
    return keras.layers.ReLU(dtype=self.policy, name=name)

  def add(self, name: str):
    return keras.layers.Add(dtype=self.policy, name=name)

  def classifier(self, features, num_classes: int, dropout_rate: float):
    """Global average pool -> dropout -> dense -> float32 logits."""
    x = keras.layers.GlobalAveragePooling2D(dtype=self.policy,
                                            name='head_pool')(features)
    x = keras.layers.Dropout(dropout_rate, dtype=self.policy,
                             name='head_dropout')(x)
    x = keras.layers.Dense(
        num_classes, kernel_initializer=dense_initializer(num_classes),
        bias_initializer='zeros', dtype=self.policy, name='head_dense')(x)
    return float32_logits(x)


def float32_logits(x):
  """Casts the classifier's output to float32 (identity under float32)."""
  return keras.layers.Activation('linear', dtype='float32', name='logits')(x)


@contextlib.contextmanager
def without_weights():
  """Builds networks as layers and shapes only: no weight gets a value.

  Inside a `keras.StatelessScope(initialize_variables=False)` Keras creates
  variables lazily, recording shape and initializer. That lets us count the
  parameters of a 480M-parameter network, or read a Keras-built network's
  config, without allocating or initialising gigabytes. Keras also queues
  such variables for initialisation at the next scope exit, so they are
  taken off that queue here: the models built inside are for inspection
  only and cannot be called.
  """
  queued = list(global_state.get_global_attribute(
      'uninitialized_variables', None) or [])
  try:
    with keras.StatelessScope(initialize_variables=False):
      yield
  finally:
    global_state.set_global_attribute('uninitialized_variables', queued)
