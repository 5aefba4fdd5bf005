"""A plain supervised step: the baseline MPL is compared against.

It trains one network on the labeled images only, with the same loss
scaling, weight decay and clipping as the MPL step's networks, so that the
comparison in the demo differs only in what MPL adds.
"""

from typing import Dict

import keras
import tensorflow as tf

from mpl_tf import loss_scale
from mpl_tf import losses
from mpl_tf import optim
from mpl_tf.config import OptimConfig
from mpl_tf.microbatches import Microbatches
from mpl_tf.models import normalization_weights
from mpl_tf.health import NonFiniteGuard, float_state

SUM = tf.distribute.ReduceOp.SUM


class SupervisedStep:
  """Owns the non-finite guard; call it with {labeled_images, labels}.

  Its step counter is the optimizer's iteration count.
  """

  def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer,
               optim_config: OptimConfig, label_smoothing: float,
               global_batch: int, nonfinite: str = 'stop',
               microbatches: int = 1):
    self.model = model
    self.optimizer = optimizer
    self.optim_config = optim_config
    self.label_smoothing = label_smoothing
    self.global_batch = global_batch
    self._no_decay = normalization_weights(model)
    # The batch's block, on the batch or on K chunks (microbatches.py).
    self.chunks = Microbatches(microbatches, (model,))
    # A non-finite step is skipped whole or stops the run (health.py);
    # float16 networks get their loss scaled (loss_scale.py).
    self.loss_scale = loss_scale.DynamicLossScale.for_network(model, 'model')
    self.guard = NonFiniteGuard(nonfinite, float_state(model, optimizer),
                                loss_scales=(self.loss_scale,))

  def __call__(self, batch: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """One step under the non-finite guard; returns its metrics."""
    step = tf.identity(self.optimizer.iterations)
    metrics, _ = self.guard.run(
        step, lambda: (self._update(batch), None),
        ('supervised/loss', 'supervised/grad_norm'),
        forward=('supervised/loss',))
    return metrics

  def _update(self, batch: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    replica_context = tf.distribute.get_replica_context()
    variables = self.model.trainable_variables

    def gradient(chunk):
      images, labels = chunk
      labels = tf.cast(labels, tf.int32)
      with tf.GradientTape() as tape:
        logits = self.model(images, training=True)
        loss = losses.cross_entropy(losses.one_hot(labels, logits), logits,
                                    self.global_batch, self.label_smoothing)
      return self.loss_scale.gradient(tape, loss, variables), loss

    grads, loss = self.chunks.sum(
        gradient, (batch['labeled_images'], batch['labels']))
    grads = self.loss_scale.unscaled(replica_context.all_reduce(SUM, grads))
    learning_rate = tf.cast(self.optimizer.learning_rate, tf.float32)
    grad_norm = optim.apply_global_gradients(
        self.optimizer, self.optim_config, grads, variables, self._no_decay)
    return {'supervised/loss': replica_context.all_reduce(SUM, loss),
            'supervised/grad_norm': grad_norm,
            'supervised/learning_rate': learning_rate}
