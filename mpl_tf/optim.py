"""Learning-rate schedules, optimizers, weight decay and clipping.

The released code trains both networks with TF1's
`tf.train.MomentumOptimizer(lr, 0.9, use_nesterov=True)`, adds coupled L2
weight decay to the gradients, and clips them by global norm (spec 3.8).
`Tf1Momentum` is that optimizer in Keras 3. Keras's own SGD stays available
(`OptimConfig.optimizer = 'keras_sgd'`), with Keras's decoupled weight decay.
Which of the two decays a network gets is decided here, in
`make_optimizer` and `coupled_weight_decay`, and nowhere else: the steps ask
`coupled_weight_decay` what to add to their gradients and know nothing more.

The steps sum gradients across replicas themselves, where the reduction is
written, because they need the global gradients (for the exact feedback h,
for global-norm clipping, for weight decay added once). Keras's TensorFlow
optimizers sum gradients across replicas again inside `apply_gradients`;
every optimizer made here turns that hidden second sum off, and
`sum_gradients_once` turns it off in one made elsewhere.
"""

import math
import types
from typing import List, Optional, Sequence

import keras
from keras import ops
import tensorflow as tf

from mpl_tf.config import OptimConfig
from mpl_tf.models import normalization_weights


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
  """The released code's cosine schedule with warm-up and an initial wait.

  With s = step - wait: 0 while s < 0; base * (s + 1) / warmup while
  s < warmup; then base * 0.5 * (1 + cos(pi * min(s - warmup, D) / D)) with
  D = total - warmup - wait, so the rate reaches 0 exactly at `total` and
  stays there.
  """

  def __init__(self, base_lr: float, total_steps: int, warmup_steps: int = 0,
               wait_steps: int = 0):
    self.base_lr = float(base_lr)
    self.total_steps = int(total_steps)
    self.warmup_steps = int(warmup_steps)
    self.wait_steps = int(wait_steps)

  def __call__(self, step):
    s = tf.cast(step, tf.float32) - float(self.wait_steps)
    # max(1, .) only guards a run with no decay phase at all.
    decay_steps = float(
        max(1, self.total_steps - self.warmup_steps - self.wait_steps))
    warmup = self.base_lr * (s + 1.0) / float(max(1, self.warmup_steps))
    progress = tf.minimum(s - self.warmup_steps, decay_steps) / decay_steps
    cosine = self.base_lr * 0.5 * (1.0 + tf.cos(math.pi * progress))
    rate = tf.where(s < float(self.warmup_steps), warmup, cosine)
    return tf.where(s < 0.0, 0.0, rate)

  def get_config(self):
    return dict(base_lr=self.base_lr, total_steps=self.total_steps,
                warmup_steps=self.warmup_steps, wait_steps=self.wait_steps)


class _GradientsAlreadySummed:
  """Mixin: `apply_gradients` takes gradients already summed across replicas.

  Keras's TensorFlow optimizer all-reduces (sums) the gradients it is given
  when called in a replica context. The steps have done that already, so a
  second sum would multiply every update by the number of replicas.
  """

  def _all_reduce_sum_gradients(self, grads_and_vars):
    return list(grads_and_vars)


class Tf1Momentum(_GradientsAlreadySummed, keras.optimizers.Optimizer):
  """TF1's MomentumOptimizer: the accumulator excludes the learning rate.

    a <- momentum * a + g
    w <- w - lr * (g + momentum * a)    (nesterov)
    w <- w - lr * a                     (otherwise)

  Keras's SGD keeps v = momentum * v - lr * g instead, which is the same
  only while lr is constant: when the rate changes, Keras's velocity still
  carries the old rates, and while lr = 0 (the student's wait) it collects
  nothing, where TF1's accumulator keeps collecting gradients that the first
  non-zero rate then applies. The accumulator is a Keras optimizer variable,
  so tf.train.Checkpoint saves and restores it with the optimizer.

  Weight decay is not this optimizer's business: the released code adds it
  to the gradients (`decay_and_clip`) before they get here.
  """

  def __init__(self, learning_rate=0.01, momentum: float = 0.9,
               nesterov: bool = True, name: str = 'tf1_momentum', **kwargs):
    if kwargs.get('weight_decay') is not None:
      raise ValueError('Tf1Momentum takes no weight_decay: the coupled L2 '
                       'term is added to the gradients by decay_and_clip.')
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f'momentum={momentum} must be in [0, 1).')
    self.momentum = float(momentum)
    self.nesterov = bool(nesterov)

  def build(self, variables):
    if self.built:
      return
    super().build(variables)
    # Zeros, as TF1's slot; none at momentum 0, where a = g.
    self.accumulators = []
    if self.momentum:
      self.accumulators = self.add_optimizer_variables(variables,
                                                       'accumulator')

  def update_step(self, gradient, variable, learning_rate):
    learning_rate = ops.cast(learning_rate, variable.dtype)
    gradient = ops.cast(gradient, variable.dtype)
    if not self.momentum:
      self.assign_sub(variable, ops.multiply(gradient, learning_rate))
      return
    # Made in the variable's dtype: a cast would round 0.9 to float32 first.
    momentum = ops.convert_to_tensor(self.momentum, dtype=variable.dtype)
    accumulator = self.accumulators[self._get_variable_index(variable)]
    self.assign(accumulator, ops.add(ops.multiply(accumulator, momentum),
                                     gradient))
    if self.nesterov:
      step = ops.add(gradient, ops.multiply(accumulator, momentum))
    else:
      step = accumulator
    self.assign_sub(variable, ops.multiply(step, learning_rate))

  def get_config(self):
    config = super().get_config()
    config.update(momentum=self.momentum, nesterov=self.nesterov)
    return config


class SummedGradientsSGD(_GradientsAlreadySummed, keras.optimizers.SGD):
  """Keras's SGD (velocity includes the rate) on already-summed gradients."""


def sum_gradients_once(optimizer: keras.optimizers.Optimizer) -> None:
  """Turns off the second cross-replica sum of an optimizer made elsewhere.

  For any Keras optimizer handed to a step (mpl_tf.MetaPseudoLabels takes
  the user's): this instance's `apply_gradients` then takes the step's
  summed gradients as they are, as the optimizers made here do.
  """
  optimizer._all_reduce_sum_gradients = types.MethodType(  # pylint: disable=protected-access
      _GradientsAlreadySummed._all_reduce_sum_gradients, optimizer)  # pylint: disable=protected-access


def learning_rates(optim: OptimConfig):
  """(teacher, student) schedules; the released code scales by B / 256."""
  scale = optim.labeled_batch_size / 256.0 if optim.scale_lr_by_batch else 1.0
  teacher = WarmupCosine(optim.teacher_lr * scale, optim.num_steps,
                         optim.teacher_warmup_steps)
  student = WarmupCosine(optim.student_lr * scale, optim.num_steps,
                         optim.student_warmup_steps, optim.student_wait_steps)
  return teacher, student


def coupled_weight_decay(optim: OptimConfig) -> float:
  """The L2 coefficient the steps add to their gradients (g + wd * w).

  'tf1_momentum' (the released code): `optim.weight_decay`. 'keras_sgd':
  0, because that optimizer applies its own decoupled decay and the two
  must not both act.
  """
  if optim.optimizer == 'tf1_momentum':
    return optim.weight_decay
  if optim.optimizer == 'keras_sgd':
    return 0.0
  raise ValueError(f'optimizer={optim.optimizer!r} is not tf1_momentum or '
                   f'keras_sgd.')


def make_optimizer(learning_rate, optim: OptimConfig, name: str,
                   model: Optional[keras.Model] = None
                   ) -> keras.optimizers.Optimizer:
  """The optimizer `optim.optimizer` names, for already-summed gradients.

  Args:
    learning_rate: a float or a schedule of the optimizer's own iteration
      count (one apply per training step, so it equals the step).
    optim: the configuration.
    name: the optimizer's name (it prefixes its variables).
    model: the network it will train. When given, the optimizer is built on
      its trainable variables at once, in the current distribution scope:
      under MirroredStrategy the slots cannot be created later, inside the
      first tf.function call of `strategy.run`, and a checkpoint read before
      the first step then restores them at once. 'keras_sgd' with weight
      decay needs it to exempt the batch-norm weights (by object) from its
      decoupled decay, the same weights the coupled decay exempts.

  Returns:
    'tf1_momentum': `Tf1Momentum` (weight decay comes with the gradients,
    see `coupled_weight_decay`). 'keras_sgd': `SummedGradientsSGD` with
    Keras's decoupled decay w <- w - lr * wd * w.
  """
  nesterov = optim.nesterov and optim.momentum > 0
  if optim.optimizer == 'tf1_momentum':
    optimizer = Tf1Momentum(learning_rate, momentum=optim.momentum,
                            nesterov=nesterov, name=name)
  elif optim.optimizer == 'keras_sgd':
    decoupled = optim.weight_decay or None
    if decoupled and model is None:
      raise ValueError('make_optimizer(optimizer=keras_sgd, weight_decay > '
                       '0) needs model= to exempt its batch-norm weights '
                       'from the decay.')
    optimizer = SummedGradientsSGD(learning_rate=learning_rate,
                                   momentum=optim.momentum, nesterov=nesterov,
                                   weight_decay=decoupled, name=name)
    if decoupled:
      optimizer.exclude_from_weight_decay(
          var_list=normalization_weights(model))
  else:
    raise ValueError(f'optimizer={optim.optimizer!r} is not tf1_momentum or '
                     f'keras_sgd.')
  if model is not None:
    optimizer.build(model.trainable_variables)
  return optimizer


def decay_and_clip(grads: Sequence[tf.Tensor], variables: Sequence,
                   exempt: Sequence, weight_decay: float,
                   clip_norm: float) -> (List[tf.Tensor], tf.Tensor):
  """Coupled L2 (g + wd * w) on non-exempt variables, then global-norm clip.

  `grads` must already be summed across replicas, so the decay is added once.
  Batch-norm weights are exempt; the classifier bias is not (released code).
  Pass `coupled_weight_decay(optim)` as `weight_decay`, so that it is 0 when
  the optimizer decays the weights itself.

  Returns:
    (clipped gradients, global norm before clipping).
  """
  exempt_ids = {id(v) for v in exempt}
  decayed = []
  for grad, var in zip(grads, variables):
    if weight_decay and id(var) not in exempt_ids:
      grad = grad + weight_decay * tf.cast(var, grad.dtype)
    decayed.append(grad)
  clipped, norm = tf.clip_by_global_norm(decayed, clip_norm)
  return clipped, norm


def apply_global_gradients(optimizer: keras.optimizers.Optimizer,
                           optim: OptimConfig, grads: Sequence[tf.Tensor],
                           variables: Sequence, exempt: Sequence) -> tf.Tensor:
  """One network's update from gradients already summed across replicas.

  The coupled L2 term the optimizer wants (`coupled_weight_decay`), then
  global-norm clipping, then the optimizer's step: the same order for every
  network of every step. Returns the global norm before clipping.
  """
  update, norm = decay_and_clip(grads, variables, exempt,
                                coupled_weight_decay(optim),
                                optim.grad_clip_norm)
  optimizer.apply_gradients(zip(update, variables))
  return norm
