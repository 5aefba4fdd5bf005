"""Learning-rate schedules, optimizers, weight decay and clipping.

The MPL step sums gradients across replicas itself, where the reduction is
written, because it needs the global gradients (for the exact feedback h, for
global-norm clipping, for weight decay added once). Keras's TensorFlow
optimizers sum gradients across replicas again inside `apply_gradients`;
`SummedGradientsSGD` turns that hidden second sum off.
"""

import math
from typing import List, Sequence

import keras
import tensorflow as tf

from mpl_tf.config import OptimConfig


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
  """The released code's cosine schedule with warm-up and an initial wait.

  With s = step - wait: 0 while s < 0; base * (s + 1) / warmup while
  s < warmup; then base * 0.5 * (1 + cos(pi * min(s - warmup, D) / D)) with
  D = total - warmup - wait, so the rate reaches 0 exactly at `total`.
  """

  def __init__(self, base_lr: float, total_steps: int, warmup_steps: int = 0,
               wait_steps: int = 0):
    self.base_lr = float(base_lr)
    self.total_steps = int(total_steps)
    self.warmup_steps = int(warmup_steps)
    self.wait_steps = int(wait_steps)

  def __call__(self, step):
    s = tf.cast(step, tf.float32) - float(self.wait_steps)
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


class SummedGradientsSGD(keras.optimizers.SGD):
  """Keras SGD that takes gradients already summed across replicas.

  Keras's momentum folds the learning rate into the velocity, unlike the
  released code's TF1 momentum; matching TF1 is a later step (issue 5).
  """

  def _all_reduce_sum_gradients(self, grads_and_vars):
    # The MPL step has already summed these across replicas.
    return list(grads_and_vars)


def learning_rates(optim: OptimConfig):
  """(teacher, student) schedules; the released code scales by B / 256."""
  scale = optim.labeled_batch_size / 256.0 if optim.scale_lr_by_batch else 1.0
  teacher = WarmupCosine(optim.teacher_lr * scale, optim.num_steps,
                         optim.teacher_warmup_steps)
  student = WarmupCosine(optim.student_lr * scale, optim.num_steps,
                         optim.student_warmup_steps, optim.student_wait_steps)
  return teacher, student


def make_optimizer(learning_rate, optim: OptimConfig,
                   name: str) -> keras.optimizers.Optimizer:
  return SummedGradientsSGD(learning_rate=learning_rate,
                            momentum=optim.momentum,
                            nesterov=optim.nesterov and optim.momentum > 0,
                            name=name)


def decay_and_clip(grads: Sequence[tf.Tensor], variables: Sequence,
                   exempt: Sequence, weight_decay: float,
                   clip_norm: float) -> (List[tf.Tensor], tf.Tensor):
  """Coupled L2 (g + wd * w) on non-exempt variables, then global-norm clip.

  `grads` must already be summed across replicas, so the decay is added once.
  Batch-norm weights are exempt; the classifier bias is not (released code).

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
