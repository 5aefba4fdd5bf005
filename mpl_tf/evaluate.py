"""Top-1/top-5 accuracy and loss of a model over a padded, masked eval set.

Eval batches are padded to a fixed shape (static shapes for TPU); the mask
marks the real examples, and every count is mask-weighted.
"""

from typing import Dict

import keras
import tensorflow as tf


def _batch_counts(model: keras.Model, batch: Dict[str, tf.Tensor]):
  logits = tf.cast(model(batch['images'], training=False), tf.float32)
  labels = tf.cast(batch['labels'], tf.int32)
  mask = tf.cast(batch['mask'], tf.float32)
  k = min(5, logits.shape[-1])
  top1 = tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32)
  topk = tf.cast(tf.math.in_top_k(labels, logits, k), tf.float32)
  loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
  return tf.stack([tf.reduce_sum(top1 * mask), tf.reduce_sum(topk * mask),
                   tf.reduce_sum(loss * mask), tf.reduce_sum(mask)])


class Evaluator:
  """Evaluates any model of the same input shape; traces once per model."""

  def __init__(self):
    self._functions = {}

  def __call__(self, model: keras.Model, dataset) -> Dict[str, float]:
    if id(model) not in self._functions:
      self._functions[id(model)] = tf.function(
          lambda batch: _batch_counts(model, batch))
    count_fn = self._functions[id(model)]
    totals = tf.zeros([4])
    for batch in dataset:
      totals += count_fn(batch)
    top1, top5, loss, count = totals.numpy().tolist()
    if count == 0:
      raise ValueError('the evaluation set is empty.')
    return {'top1': top1 / count, 'top5': top5 / count, 'loss': loss / count,
            'count': int(count)}
