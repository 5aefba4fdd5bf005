"""Exponential moving average of the student, batch-norm statistics included.

The released code evaluates the EMA student. Its decay warms up as
d = min(decay, (step + 1) / (step + 10)), so the EMA's initial value fades
fast: with decay >= 0.5, 0.1 of it is left after step 1, 0.0045 after step
3 and 8.7e-5 after step 7 (1 / C(t + 9, 9) after step t); less with a
smaller decay, and none after one step with decay 0.
Where it starts is MplConfig.ema_init (`initialize`).
"""

import keras
import tensorflow as tf

from mpl_tf.models import batch_norm_offsets_and_variances


def initialize(ema_model: keras.Model, model: keras.Model, rule: str) -> None:
  """Sets the EMA's initial value, once, when the EMA network is created.

  'copy': the student's weights. 'released_code': the released
  common_utils.setup_ema, whose variables start at
  tf.initializers.ones() when their name contains "variance" or "beta" and
  at zeros otherwise (its `get_init`). The released names with those words
  are the batch-norm layers' `beta` and `moving_variance`
  (modeling_utils.sync_batch_norm), so here the batch-norm offsets and
  moving variances start at 1, chosen by object; every other EMA variable,
  kernels, biases, batch-norm `gamma` and `moving_mean` included, at 0.

  Only at creation: the training loop calls it before restoring a
  checkpoint, which then overwrites every EMA variable with its saved value,
  so a resumed run continues from the average it had, not from this start.
  """
  if rule == 'copy':
    ema_model.set_weights(model.get_weights())
    return
  if rule != 'released_code':
    raise ValueError(f'ema_init={rule!r} is not copy or released_code.')
  ones = {id(variable)
          for variable in batch_norm_offsets_and_variances(ema_model)}
  for variable in ema_model.weights:
    fill = tf.ones if id(variable) in ones else tf.zeros
    variable.assign(fill(variable.shape, variable.dtype))


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
