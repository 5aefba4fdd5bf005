"""The UDA baseline: one network, supervised CE plus weighted UDA consistency.

This is the MPL teacher's loss without the feedback term (Xie et al.'s UDA as
the released code computes it: sharpened, confidence-masked targets from the
original view, divided by the global unlabeled batch, weight ramped
linearly), trained by itself, so the paper's UDA row runs with the same
data, optimizer, schedule and seed as MPL.
"""

from typing import Dict, Optional

import keras
import tensorflow as tf

from mpl_tf import ema
from mpl_tf import loss_scale
from mpl_tf import losses
from mpl_tf import optim
from mpl_tf.config import MplConfig, OptimConfig
from mpl_tf.microbatches import Microbatches
from mpl_tf.models import normalization_weights
from mpl_tf.health import NonFiniteGuard, float_state

SUM = tf.distribute.ReduceOp.SUM


class UdaStep:
  """Owns the step counter; call it with the MPL batch dict."""

  def __init__(self, mpl_config: MplConfig, optim_config: OptimConfig,
               model: keras.Model, optimizer: keras.optimizers.Optimizer, *,
               global_labeled_batch: int, global_unlabeled_batch: int,
               ema_model: Optional[keras.Model] = None,
               nonfinite: str = 'stop'):
    self.config = mpl_config
    self.optim_config = optim_config
    self.model = model
    self.optimizer = optimizer
    self.ema_model = ema_model
    self.global_labeled_batch = global_labeled_batch
    self.global_unlabeled_batch = global_unlabeled_batch
    self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
    self._no_decay = normalization_weights(model)
    # The batch's block, on the batch or on K chunks (microbatches.py).
    self.chunks = Microbatches(mpl_config.microbatches, (model,))
    # A non-finite step is skipped whole or stops the run (health.py);
    # float16 networks get their loss scaled (loss_scale.py).
    self.loss_scale = loss_scale.DynamicLossScale.for_network(model, 'model')
    self.guard = NonFiniteGuard(nonfinite,
                                float_state(model, ema_model, optimizer),
                                loss_scales=(self.loss_scale,))

  def checkpoint_items(self) -> Dict[str, tf.Module]:
    items = dict(model=self.model, optimizer=self.optimizer, step=self.step,
                 health=self.guard.checkpoint_item())
    if self.ema_model is not None:
      # The key checkpoints.DEFAULT_ITEM names: what export serves.
      items['ema_student'] = self.ema_model
    return items

  def __call__(self, batch: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """One UDA step under the non-finite guard; returns its metrics."""
    metrics, _ = self.guard.run(
        self.step, lambda: (self._update(batch), None),
        ('uda/supervised_loss', 'uda/consistency_loss', 'uda/grad_norm'),
        forward=('uda/supervised_loss', 'uda/consistency_loss'))
    self.step.assign_add(1)
    return metrics

  def _update(self, batch: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    cfg = self.config
    replica_context = tf.distribute.get_replica_context()
    variables = self.model.trainable_variables
    weight = losses.uda_weight(self.step, cfg.uda_weight, cfg.uda_steps)

    def gradient(chunk):
      images_labeled, labels, images_ori, images_aug = chunk
      labels = tf.cast(labels, tf.int32)
      local_labeled = tf.shape(images_labeled)[0]
      local_unlabeled = tf.shape(images_ori)[0]
      with tf.GradientTape() as tape:
        logits = self.model(
            tf.concat([images_labeled, images_ori, images_aug], axis=0),
            training=True)
        logits_labeled, logits_ori, logits_aug = tf.split(
            logits, [local_labeled, local_unlabeled, local_unlabeled])
        supervised_loss = losses.cross_entropy(
            losses.one_hot(labels, logits_labeled), logits_labeled,
            self.global_labeled_batch, cfg.label_smoothing)
        consistency_loss, mask_rate = losses.uda_consistency(
            logits_ori, logits_aug, cfg.uda_temperature, cfg.uda_threshold,
            self.global_unlabeled_batch)
        loss = supervised_loss + tf.cast(weight, consistency_loss.dtype) * (
            consistency_loss)
      return (self.loss_scale.gradient(tape, loss, variables),
              supervised_loss, consistency_loss, mask_rate)

    grads, supervised_loss, consistency_loss, mask_rate = self.chunks.sum(
        gradient, (batch['labeled_images'], batch['labels'],
                   batch['unlabeled_images_ori'],
                   batch['unlabeled_images_aug']))
    mask_rate = self.chunks.mean(mask_rate)
    grads = self.loss_scale.unscaled(replica_context.all_reduce(SUM, grads))
    learning_rate = tf.cast(self.optimizer.learning_rate, tf.float32)
    grad_norm = optim.apply_global_gradients(
        self.optimizer, self.optim_config, grads, variables, self._no_decay)
    if self.ema_model is not None:
      ema.update(self.ema_model, self.model,
                 ema.decay_at(self.step, self.optim_config.ema_decay))
    f32 = lambda x: tf.cast(x, tf.float32)
    return {
        'uda/supervised_loss': replica_context.all_reduce(
            SUM, f32(supervised_loss)),
        'uda/consistency_loss': replica_context.all_reduce(
            SUM, f32(consistency_loss)),
        'uda/mask_rate': f32(mask_rate),
        'uda/weight': f32(weight),
        'uda/grad_norm': f32(grad_norm),
        'uda/learning_rate': learning_rate,
    }
