"""Top-1/top-5 accuracy and loss of a model over a padded, masked eval set.

Eval batches are padded to a fixed shape (static shapes for TPU); the mask
marks the real examples, and every count is mask-weighted. Under a strategy
each replica counts its own batches and the counts are summed across
replicas on the host side of the call (`strategy.reduce(SUM)`).
"""

import statistics
from typing import Any, Dict, List, Optional

import keras
import tensorflow as tf

from mpl_tf.config import Config
from mpl_tf.data import pipeline

SUM = tf.distribute.ReduceOp.SUM


def batch_counts(model: keras.Model, batch: Dict[str, tf.Tensor]) -> tf.Tensor:
  """[top-1 hits, top-5 hits, summed loss, real examples] of one batch."""
  logits = tf.cast(model(batch['images'], training=False), tf.float32)
  labels = tf.cast(batch['labels'], tf.int32)
  mask = tf.cast(batch['mask'], tf.float32)
  k = min(5, logits.shape[-1])
  top1 = tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32)
  topk = tf.cast(tf.math.in_top_k(labels, logits, k), tf.float32)
  loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
  return tf.stack([tf.reduce_sum(top1 * mask), tf.reduce_sum(topk * mask),
                   tf.reduce_sum(loss * mask), tf.reduce_sum(mask)])


def _as_result(totals) -> Dict[str, float]:
  top1, top5, loss, count = [float(x) for x in totals]
  if count == 0:
    raise ValueError('the evaluation set is empty.')
  return {'top1': top1 / count, 'top5': top5 / count, 'loss': loss / count,
          'count': int(round(count))}


class Evaluator:
  """Evaluates any model on a (distributed) eval dataset; traces once per model.

  Without a strategy, `dataset` is a plain tf.data.Dataset; with one, it is
  what `strategy.distribute_datasets_from_function` returned.
  """

  def __init__(self, strategy: Optional[tf.distribute.Strategy] = None):
    self.strategy = strategy
    self._functions = {}

  def _count_fn(self, model: keras.Model):
    """One tf.function per model that loops over a whole dataset in graph.

    The loop runs inside the function (autograph turns `for batch in
    dataset` into a dataset loop), so a pass costs one call, not one Python
    round trip per batch; a new dataset of the same element spec reuses the
    trace.
    """
    if id(model) not in self._functions:
      strategy = self.strategy

      # Traced as written (no Python control flow on tensors): AutoGraph
      # would convert the model's call, seconds per model on 2 cores.
      @tf.autograph.experimental.do_not_convert
      def counts(batch):
        if strategy is None:
          return batch_counts(model, batch)
        per_replica = strategy.run(lambda b: batch_counts(model, b),
                                   args=(batch,))
        return strategy.reduce(SUM, per_replica, axis=None)

      @tf.function
      def count_dataset(dataset):
        totals = tf.zeros([4])
        for batch in dataset:
          totals += counts(batch)
        return totals

      self._functions[id(model)] = (model, count_dataset)
    return self._functions[id(model)][1]

  def __call__(self, model: keras.Model, dataset) -> Dict[str, float]:
    return _as_result(self._count_fn(model)(dataset).numpy().tolist())


def evaluate_split(evaluator: Evaluator, config: Config,
                   manifest: Dict[str, Any], model: keras.Model,
                   split: str) -> Dict[str, float]:
  """Top-1/top-5/loss of `model` on a split, on the evaluator's strategy.

  Every replica (every TPU core or GPU, on every host) takes its share of
  the padded eval batches; the counts are exact (pipeline.eval_dataset). A
  bad record is reported by file and index rather than as a tf.data error.
  """
  batch_size = config.run.eval_batch_size
  strategy = evaluator.strategy
  if strategy is None:
    dataset = pipeline.eval_dataset(config, manifest, split, batch_size)
  else:
    dataset = strategy.distribute_datasets_from_function(
        lambda context: pipeline.eval_dataset(config, manifest, split,
                                              batch_size, context))
  try:
    return evaluator(model, dataset)
  except tf.errors.OpError as error:
    problem = pipeline.find_input_problem(config, manifest, (split,), error)
    if problem is None:
      raise
    raise problem from error


def summarize(history: List[Dict], median_last: int) -> Dict:
  """Final, best-on-validation and median-of-last-k of an eval history.

  `history` holds one entry per evaluation, in order: {'step', 'validation':
  {...}, 'test': {...}}. The best entry is chosen on validation top-1 only
  (the first of ties); its test accuracy is what is reported for it, so the
  test set never selects anything.
  """
  if not history:
    return {}
  best = max(history, key=lambda entry: entry['validation']['top1'])
  last = history[-median_last:]
  median = lambda split, key: statistics.median(e[split][key] for e in last)
  return {
      'final': history[-1],
      'best_on_validation': best,
      'median_last': {
          'k': len(last),
          'validation': {key: median('validation', key)
                         for key in ('top1', 'top5')},
          'test': {key: median('test', key) for key in ('top1', 'top5')}},
  }
