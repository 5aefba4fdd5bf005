"""Top-1/top-5 accuracy and loss of a model, a checkpoint or an export.

Eval batches are padded to a fixed shape (static shapes for TPU); the mask
marks the real examples, and every count is mask-weighted. Each host reads
only its share of a split (data/eval_stream.py); every replica runs the same
number of batches in one tf.function per evaluation, adds its counts into
its own copy of a sync-on-read variable, and the copies are summed across
replicas and hosts once, when the function reads them at the end.

`evaluate` (`--mode=eval` in main.py) takes a checkpoint, restored as
checkpoints.py does, or an export, loaded as serving.py does and fed a
split's raw pixels (`eval_images`), so a checkpoint and its export are
measured with the same keys and can be compared directly.
"""

import statistics
from typing import Any, Dict, Iterable, List, Optional, Union

import keras
import numpy as np
import tensorflow as tf

from mpl_tf import checkpoints
from mpl_tf import export_format
from mpl_tf import serving as serving_lib
from mpl_tf.config import Config
from mpl_tf.data import pipeline
from mpl_tf.data import records

def _nonfinite_rows(logits: tf.Tensor) -> tf.Tensor:
  """1.0 for each example whose logits hold a NaN or Inf, else 0.0."""
  return 1.0 - tf.cast(tf.reduce_all(tf.math.is_finite(logits), axis=-1),
                       tf.float32)


def batch_counts(model: keras.Model, batch: Dict[str, tf.Tensor]) -> tf.Tensor:
  """[top-1 hits, top-5 hits, summed loss, real examples, examples with
  non-finite logits] of one batch.

  The last count exists because in_top_k counts a NaN logit as a miss: a
  network whose weights overflow would otherwise score a plausible-looking
  0.0000 instead of being reported as broken (`nonfinite_networks`).
  """
  logits = tf.cast(model(batch['images'], training=False), tf.float32)
  labels = tf.cast(batch['labels'], tf.int32)
  mask = tf.cast(batch['mask'], tf.float32)
  k = min(5, logits.shape[-1])
  top1 = tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32)
  topk = tf.cast(tf.math.in_top_k(labels, logits, k), tf.float32)
  loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
  return tf.stack([tf.reduce_sum(top1 * mask), tf.reduce_sum(topk * mask),
                   tf.reduce_sum(loss * mask), tf.reduce_sum(mask),
                   tf.reduce_sum(_nonfinite_rows(logits) * mask)])


def _as_result(totals) -> Dict[str, float]:
  """The result dict; `nonfinite` counts examples with NaN or Inf logits."""
  top1, top5, loss, count, nonfinite = [float(x) for x in totals]
  if count == 0:
    raise ValueError('the evaluation set is empty.')
  return {'top1': top1 / count, 'top5': top5 / count, 'loss': loss / count,
          'count': int(round(count)), 'nonfinite': int(round(nonfinite))}


def nonfinite_networks(results: Dict[str, Any]) -> Optional[str]:
  """'name (N of M validation images, ...)' for networks with non-finite
  outputs in `results` ({name: {split: result}}), or None if there are none.

  A result of an older version, without the count, counts as finite.
  """
  broken = []
  for name, splits in results.items():
    found = [f'{splits[split]["nonfinite"]} of {splits[split]["count"]} '
             f'{split} images' for split in ('validation', 'test')
             if isinstance(splits, dict) and
             splits.get(split, {}).get('nonfinite')]
    if found:
      broken.append(f'{name} ({", ".join(found)})')
  return '; '.join(broken) or None


_ON_READ = tf.VariableSynchronization.ON_READ
_SUM_ON_READ = tf.VariableAggregation.SUM


class Evaluator:
  """Evaluates any model on a (distributed) eval dataset; traces once per model.

  Without a strategy, `dataset` is a plain tf.data.Dataset; with one, it is
  what `strategy.distribute_datasets_from_function` returned. Either way
  `steps` batches (per replica) are taken from it.

  Why not sum each batch's counts with `strategy.reduce` in the loop (as
  this class did): under MultiWorkerMirroredStrategy that is an all-reduce
  across every host per batch, and on a TPU each batch's counts leave the
  chips for the host. Here the counts stay on each replica's device until
  the one reduction after the last batch (device_loop.py does the same for
  training metrics).
  """

  def __init__(self, strategy: Optional[tf.distribute.Strategy] = None):
    self.strategy = strategy
    self._functions = {}
    self._totals = None

  def _make_totals(self) -> tf.Variable:
    """[top-1, top-5, loss, count, nonfinite] sums, one copy per replica."""
    with tf.init_scope():
      if self.strategy is None:
        return tf.Variable(tf.zeros([5]), trainable=False,
                           name='eval_totals')
      with self.strategy.scope():
        return tf.Variable(tf.zeros([5]), trainable=False,
                           synchronization=_ON_READ, aggregation=_SUM_ON_READ,
                           name='eval_totals')

  def _count_fn(self, model: keras.Model):
    """One tf.function per model: `steps` batches in a graph loop.

    A new dataset of the same element spec, and any number of steps, reuse
    the trace.
    """
    if id(model) not in self._functions:
      strategy, totals = self.strategy, self._totals

      # Traced as written (no Python control flow on tensors): AutoGraph
      # would convert the model's call, seconds per model on 2 cores.
      @tf.autograph.experimental.do_not_convert
      def add(batch):
        # Replica context: each replica adds into its own copy.
        totals.assign_add(batch_counts(model, batch), read_value=False)

      @tf.function
      def count_dataset(iterator, steps):
        # Without read_value=False, a cross-replica assign of a sync-on-read
        # variable returns its value read back: a reduction of its own.
        totals.assign(tf.zeros([5]), read_value=False)
        for _ in tf.range(steps):
          if strategy is None:
            add(next(iterator))
          else:
            strategy.run(add, args=(next(iterator),))
        # Cross-replica context: reading a sync-on-read SUM variable sums
        # the replicas' copies, on every host: the one reduction.
        return totals.read_value()

      self._functions[id(model)] = (model, count_dataset)
    return self._functions[id(model)][1]

  def __call__(self, model: keras.Model, dataset,
               steps: int) -> Dict[str, float]:
    if self._totals is None:
      self._totals = self._make_totals()
    totals = self._count_fn(model)(iter(dataset), tf.constant(steps))
    return _as_result(totals.numpy().tolist())


def evaluate_split(evaluator: Evaluator, config: Config,
                   manifest: Dict[str, Any], model: keras.Model,
                   split: str) -> Dict[str, float]:
  """Top-1/top-5/loss of `model` on a split, on the evaluator's strategy.

  Every replica (every TPU core or GPU, on every host) takes its share of
  the padded eval batches, read on its host only; the counts are exact
  (pipeline.eval_input), and checked against the manifest's. A bad record
  is reported by file and index rather than as a tf.data error.
  """
  batch_size = config.run.eval_batch_size
  strategy = evaluator.strategy
  if strategy is None:
    dataset, steps = pipeline.eval_input(config, manifest, split, batch_size,
                                         endless=True)
  else:
    # The same on every pipeline (eval_stream.plan); the dataset function
    # runs on each of this host's input pipelines, here and now.
    all_steps = set()

    def dataset_fn(context):
      dataset, steps = pipeline.eval_input(config, manifest, split,
                                           batch_size, context, endless=True)
      all_steps.add(steps)
      return dataset

    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    steps, = all_steps
  try:
    result = evaluator(model, dataset, steps)
  except tf.errors.OpError as error:
    problem = pipeline.find_input_problem(config, manifest, (split,), error)
    if problem is None:
      raise
    raise problem from error
  expected = int(manifest['counts'][split])
  if result['count'] != expected:
    raise ValueError(
        f'The evaluation of split {split!r} counted {result["count"]} images '
        f'but the manifest of {config.data.data_dir!r} announces {expected}: '
        f'its shard files do not hold the records the manifest describes '
        f'(written by another tool, or changed since). Prepare the data set '
        f'again.')
  return result


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


def eval_images(config: Config, manifest: Dict[str, Any],
                split: str, batch_size: Optional[int] = None
                ) -> tf.data.Dataset:
  """(uint8 images [n, H, W, 3], int32 labels [n]) batches of a split.

  The raw pixels, as an export takes them (`pipeline.eval_dataset` gives
  the already cropped and normalised view, for Keras models). Images of one
  size are batched together; the last batches may be smaller.
  """
  pipeline.check_manifest(config, manifest)
  batch_size = batch_size or config.run.eval_batch_size
  image_size = manifest.get('image_size')
  dataset = tf.data.TFRecordDataset(
      records.split_files(config.data.data_dir, split))
  dataset = dataset.map(
      lambda serialized: records.parse_example(serialized, image_size, 3),
      num_parallel_calls=tf.data.AUTOTUNE)
  if image_size is not None:
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)

  def size_key(image, unused_label):
    shape = tf.cast(tf.shape(image), tf.int64)
    return shape[0] * (1 << 31) + shape[1]

  return dataset.group_by_window(
      size_key, lambda unused_key, window: window.batch(batch_size),
      window_size=batch_size).prefetch(tf.data.AUTOTUNE)


def evaluate_saved_model(export: Union[str, serving_lib.ServingModel],
                         dataset: Iterable) -> Dict[str, float]:
  """Top-1, top-5 (top-K if K < 5) and loss of an export on a dataset.

  `dataset` yields (uint8 images [n, H, W, 3], integer labels [n]), e.g.
  `eval_images(...)`. Returns the keys of `Evaluator`: top1, top5, loss,
  count, nonfinite, so a checkpoint and its export can be compared directly.
  """
  serving = serving_lib.as_serving(export)
  k = min(5, serving.num_classes)
  top1 = topk = loss = 0.0
  count = nonfinite = 0
  for images, labels in dataset:
    labels = np.asarray(labels).astype(np.int64)
    if labels.size and (labels.min() < 0 or
                        labels.max() >= serving.num_classes):
      raise ValueError(
          f'A label outside [0, {serving.num_classes}) in the evaluation '
          f'set: the export {serving.export_dir!r} was trained on another '
          f'data set.')
    logits = tf.constant(serving(images)['logits'])
    label_tensor = tf.constant(labels, tf.int32)
    top1 += float(tf.reduce_sum(tf.cast(
        tf.math.in_top_k(label_tensor, logits, 1), tf.float32)))
    topk += float(tf.reduce_sum(tf.cast(
        tf.math.in_top_k(label_tensor, logits, k), tf.float32)))
    loss += float(tf.reduce_sum(
        tf.nn.sparse_softmax_cross_entropy_with_logits(label_tensor, logits)))
    count += int(labels.size)
    nonfinite += int(tf.reduce_sum(_nonfinite_rows(logits)))
  if count == 0:
    raise ValueError('the evaluation set is empty.')
  return {'top1': top1 / count, 'top5': topk / count, 'loss': loss / count,
          'count': count, 'nonfinite': nonfinite}


def evaluate_checkpoint(config: Config, manifest: Dict[str, Any],
                        checkpoint_path: str, split: str = 'test',
                        item: str = checkpoints.DEFAULT_ITEM
                        ) -> Dict[str, float]:
  """Top-1/top-5/loss of a checkpoint's EMA student (or `item`) on a split.

  The same model, data view and Evaluator as the training loop's
  evaluation, so the numbers match what training reported.
  """
  model = checkpoints.restore_model(config, manifest, checkpoint_path, item)
  return evaluate_split(Evaluator(), config, manifest, model, split)


def evaluate(config: Config, manifest: Dict[str, Any],
             checkpoint_or_export: str, split: str) -> Dict[str, float]:
  """`--mode=eval`: a SavedModel directory or a checkpoint, on one split.

  An export is fed the split's raw pixels and preprocesses them itself, so
  this also checks the serving path; a checkpoint (prefix, directory or
  model_dir, see resolve_checkpoint) is evaluated as training does.
  """
  if export_format.is_export(checkpoint_or_export):
    serving = serving_lib.load_serving(checkpoint_or_export)
    if serving.num_classes != int(manifest['num_classes']):
      raise ValueError(
          f'The export {checkpoint_or_export!r} has {serving.num_classes} '
          f'classes but the data in {config.data.data_dir!r} has '
          f'{manifest["num_classes"]}; evaluate it on its own data set.')
    return evaluate_saved_model(serving, eval_images(config, manifest, split))
  return evaluate_checkpoint(config, manifest, checkpoint_or_export, split)
