"""Exponential moving average of the student, batch-norm statistics included.

The released code evaluates the EMA student. Its decay warms up as
d = min(decay, (step + 1) / (step + 10)), so the EMA's initial value hardly
matters; decay 0 makes the EMA an exact copy of the student.
"""

import keras
import tensorflow as tf


def decay_at(step: tf.Tensor, decay: float) -> tf.Tensor:
  step = tf.cast(step, tf.float32)
  return tf.minimum(decay, (step + 1.0) / (step + 10.0))


def update(ema_model: keras.Model, model: keras.Model, decay: tf.Tensor):
  """ema <- ema - (1 - d) * (ema - w) for every weight, by position.

  `model.weights` holds trainable weights and batch-norm statistics (but not
  dropout seed states); both models come from the same builder, so the
  lists pair up object by object.

  In a MirroredStrategy replica context each replica updates its own copy
  (the weights' aggregation is 'none'); the copies stay identical because
  every replica reads identical student weights and the same decay
  (tests/test_optim.py checks it).
  """
  for ema_weight, weight in zip(ema_model.weights, model.weights):
    rate = tf.cast(1.0 - decay, ema_weight.dtype)
    ema_weight.assign_sub(
        rate * (ema_weight - tf.cast(weight, ema_weight.dtype)))
