"""tf.data input pipelines: the MPL training stream, the labeled-only stream
of the supervised baseline, and padded evaluation batches.

Every batch has a fully static shape, so a compiled train or eval step is
traced once (and a TPU step compiles once): training batches drop the
remainder, evaluation batches are padded and masked. Training streams repeat
forever. Their order is seeded from `DataConfig.shuffle_seed` (the labeled
stream with the seed, the unlabeled stream with seed + 1, so the two orders
differ), and so are their augmentations: batch i of a stream is augmented with
a seed folded from (shuffle_seed, stream, i), so a run sees the same images
every time it is run, and a restored iterator continues the same sequence.
Which records each input pipeline reads, in which order, is
`record_stream.py`'s job; this module batches them into views.

`DataConfig.crop` picks the released code's CIFAR or ImageNet views (see
`augment.py`). Every image leaves normalised with the manifest's per-channel
mean and std (the released code's constants for CIFAR-10 and ImageNet).

Under a distribution strategy, pass the `tf.distribute.InputContext` that
`distribute_datasets_from_function` gives: batches are then per replica
(global batch / replicas) and each input pipeline reads its share of every
split (whole shards or a record range: input_shares.py).
"""

from typing import Any, Dict, NamedTuple, Optional

import tensorflow as tf

from mpl_tf import config as config_lib
from mpl_tf.data import augment
from mpl_tf.data import eval_stream
from mpl_tf.data import record_checks
from mpl_tf.data import record_stream
from mpl_tf.data import records

AUTOTUNE = tf.data.AUTOTUNE
# The views' map functions have no Python control flow on tensors, so
# tf.data traces them as written: AutoGraph's conversion of them and of
# every augment function they call took ~4 s of each process's start on a
# 2-core machine. (RandAugment's own tf.function still uses AutoGraph.)
_traced_as_written = tf.autograph.experimental.do_not_convert
# Stream ids folded into the seeds, so streams never share random draws.
_LABELED, _UNLABELED = 0, 1
_PER_IMAGE = 10  # Offset of the per-image (Inception crop) seeds.
# After an input error, splits of up to this many records in all are scanned
# whole for the bad record; larger ones have their first records of every
# shard checked (decoding all of ImageNet takes hours).
_FULL_SCAN_LIMIT = 100_000
_SAMPLED_RECORDS = 1_000


def check_manifest(config: config_lib.Config,
                   manifest: Dict[str, Any]) -> None:
  """Raises ValueError when the prepared images cannot feed this config."""
  data = config.data
  stored = manifest.get('image_size')
  if data.crop == 'pad_crop':
    if stored is None:
      raise ValueError(
          f'The images in {data.data_dir!r} vary in size, which crop='
          f'pad_crop cannot batch; pass --crop=inception (ImageNet-style '
          f'random crops resized to image_size) or prepare fixed-size images.')
    if stored != data.image_size:
      raise ValueError(
          f'The prepared images in {data.data_dir!r} are {stored}x{stored} '
          f'but image_size={data.image_size}; set --image_size={stored} (or '
          f'--crop=inception to resize them).')
  if manifest.get('channels', 3) != 3:
    raise ValueError(f'The images in {data.data_dir!r} have '
                     f'{manifest.get("channels")} channels; the networks take '
                     f'3. Prepare them again as RGB.')


def _per_pipeline(batch_size: int, input_context) -> int:
  if input_context is None:
    return batch_size
  return batch_size // input_context.num_input_pipelines


def _between_replicas(dataset: tf.data.Dataset,
                      input_context) -> tf.data.Dataset:
  """Cuts each batch of this pipeline into its replicas' consecutive shares.

  The strategy hands a pipeline's consecutive elements to its replicas in
  order, so replica r of a single pipeline gets rows [r*b, (r+1)*b) of the
  global batch that one device would get: the same images, augmented with the
  same seeds, whatever the number of replicas (the MPL step draws pseudo
  labels by global row to match).
  """
  if input_context is None:
    return dataset
  shares = (input_context.num_replicas_in_sync //
            input_context.num_input_pipelines)
  if shares == 1:
    return dataset

  def cut(batch):
    return {key: tf.reshape(value, [shares, value.shape[0] // shares,
                                    *value.shape[1:]])
            for key, value in batch.items()}

  return dataset.map(cut).unbatch()


def _sharded(config: config_lib.Config, make_stream,
             input_context) -> tf.data.Dataset:
  """`make_stream(context)`'s batches, as `data.input_sharding` asks.

  'files' (or one pipeline): the pipeline's own stream of its share of
  each split (whole shards when they deal evenly, else a contiguous record
  range; every record in one share: input_shares.py). 'global_batch': the
  stream of the whole global batch, built alike on every pipeline (the
  records of every file, the seeds of a single host), of which pipeline p
  of P keeps rows [p * b / P, (p + 1) * b / P): the rows its replicas get on
  one host, so replicas see the same images whatever the number of hosts.
  """
  pipelines = 1 if input_context is None else input_context.num_input_pipelines
  if pipelines == 1 or config.data.input_sharding == 'files':
    return make_stream(input_context)
  pipeline_id = input_context.input_pipeline_id

  def keep_share(batch):
    return {key: tf.reshape(value, [pipelines, value.shape[0] // pipelines,
                                    *value.shape[1:]])[pipeline_id]
            for key, value in batch.items()}

  return make_stream(None).map(keep_share)


def _batches(config: config_lib.Config, manifest: Dict[str, Any], split: str,
             batch_size: int, stream: int, input_context, start_step: int
             ) -> tf.data.Dataset:
  """Endless (batch index, float32 images 0..255 [b, S, S, 3], labels [b]),
  from batch `start_step` on.

  'inception' data is cropped and resized image by image before batching,
  with seeds folded from the image's position in the stream.
  """
  data = config.data
  start_record = start_step * batch_size
  dataset = record_stream.parsed_split(
      config, manifest, split, input_context, batch_size,
      data.shuffle_seed + stream, start_record)
  if data.crop == 'inception':
    image_seed = tf.constant([data.shuffle_seed, stream + _PER_IMAGE],
                             tf.int64)
    dataset = dataset.enumerate(start_record).map(
        lambda index, pair: (augment.inception_crop(
            pair[0], data.image_size, augment.fold_seed(image_seed, index),
            data.eval_crop_fraction), pair[1]),
        num_parallel_calls=AUTOTUNE)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  return dataset.enumerate(start_step).map(
      lambda index, pair: (index, tf.cast(pair[0], tf.float32), pair[1]),
      num_parallel_calls=AUTOTUNE)


def _batch_seed(config: config_lib.Config, stream: int, index,
                input_context) -> tf.Tensor:
  pipeline_id = 0 if input_context is None else input_context.input_pipeline_id
  base = tf.constant([config.data.shuffle_seed, stream], tf.int64)
  return augment.fold_seed(augment.fold_seed(base, pipeline_id), index)


def _views(config: config_lib.Config, manifest: Dict[str, Any], split: str,
           stream: int, batch_size: int, input_context, start_step: int,
           make_views) -> tf.data.Dataset:
  """`_batches` of a split, mapped by `make_views(images, labels, seed)`.

  The seed is the batch's own, folded from the stream and the batch index.
  """

  def views_of_batch(index, images, labels):
    return make_views(images, labels,
                      _batch_seed(config, stream, index, input_context))

  dataset = _batches(config, manifest, split, batch_size, stream,
                     input_context, start_step)
  return dataset.map(_traced_as_written(views_of_batch),
                     num_parallel_calls=AUTOTUNE)


def _labeled_stream(config: config_lib.Config, manifest: Dict[str, Any],
                    batch_size: int, input_context, start_step: int
                    ) -> tf.data.Dataset:
  data = config.data
  mean, std = manifest['mean'], manifest['std']

  def make_view(images, labels, seed):
    if data.crop == 'inception':
      images = augment.random_flip(images, seed)
    else:
      images = augment.flip_pad_crop(images, seed, pad=data.image_size // 8,
                                     flip=data.horizontal_flip)
    return {'labeled_images': augment.normalize(images, mean, std),
            'labels': labels}

  return _views(config, manifest, 'labeled', _LABELED, batch_size,
                input_context, start_step, make_view)


def _unlabeled_stream(config: config_lib.Config, manifest: Dict[str, Any],
                      batch_size: int, input_context, start_step: int
                      ) -> tf.data.Dataset:
  data = config.data
  mean, std = manifest['mean'], manifest['std']

  def make_views(images, labels, seed):
    ori_seed, aug_seed, flip_seed, cutout_seed = tf.unstack(
        augment.split_seed(seed, 4))
    if data.crop == 'inception':
      # One crop (made before batching) shared by both views; independent
      # flips; RandAugment on the augmented view only.
      original = augment.random_flip(images, ori_seed)
      strong = augment.rand_augment(augment.random_flip(images, flip_seed),
                                    data, aug_seed)
      strong = augment.cutout(strong, cutout_seed, data.cutout_size)
    else:
      original = augment.flip_pad_crop(images, ori_seed,
                                       pad=data.image_size // 8,
                                       flip=data.horizontal_flip)
      strong = augment.strong_view(original, data, aug_seed)
    # The labels of unlabeled images never reach a loss; the loop uses them
    # only to log the pseudo labels' accuracy where they are real.
    return {'unlabeled_images_ori': augment.normalize(original, mean, std),
            'unlabeled_images_aug': augment.normalize(strong, mean, std),
            'unlabeled_labels': labels}

  return _views(config, manifest, 'unlabeled', _UNLABELED, batch_size,
                input_context, start_step, make_views)


def train_dataset(config: config_lib.Config, manifest: Dict[str, Any],
                  input_context: Optional[tf.distribute.InputContext] = None,
                  start_step: int = 0) -> tf.data.Dataset:
  """The endless MPL training stream of dicts of static-shape tensors.

  Keys: `labeled_images` float32 [b, S, S, 3], `labels` int32 [b],
  `unlabeled_images_ori` and `unlabeled_images_aug` float32 [b*mu, S, S, 3],
  with b = config.optim.labeled_batch_size (divided by the replicas when an
  input context is given: see _between_replicas) and mu =
  config.optim.uda_ratio. The labels of
  unlabeled images come as `unlabeled_labels` int32 [b*mu], for diagnostics
  only (the pseudo labels' accuracy); no loss reads them. `start_step`: the
  stream begins with the batch a run that has done that many steps would see
  next (a resumed run passes its restored step).
  """
  check_manifest(config, manifest)

  def make_stream(context):
    labeled = _labeled_stream(
        config, manifest,
        _per_pipeline(config.optim.labeled_batch_size, context), context,
        start_step)
    unlabeled = _unlabeled_stream(
        config, manifest, _per_pipeline(config.unlabeled_batch_size, context),
        context, start_step)
    dataset = tf.data.Dataset.zip((labeled, unlabeled))
    return dataset.map(lambda first, second: {**first, **second})

  dataset = _sharded(config, make_stream, input_context)
  return _between_replicas(dataset, input_context).prefetch(AUTOTUNE)


def labeled_dataset(config: config_lib.Config, manifest: Dict[str, Any],
                    batch_size: int,
                    input_context: Optional[tf.distribute.InputContext] = None,
                    start_step: int = 0) -> tf.data.Dataset:
  """The endless labeled stream alone (supervised training and finetuning).

  Dicts of `labeled_images` float32 [b, S, S, 3] (the labeled training view,
  normalised) and `labels` int32 [b]; b = batch_size, per replica when an
  input context is given.
  """
  check_manifest(config, manifest)
  dataset = _sharded(config, lambda context: _labeled_stream(
      config, manifest, _per_pipeline(batch_size, context), context,
      start_step), input_context)
  return _between_replicas(dataset, input_context).prefetch(AUTOTUNE)


class EvalInput(NamedTuple):
  """An evaluation's input on this host: `dataset` and the `steps` (batches
  per replica) to take from it, the same on every replica of every host."""
  dataset: tf.data.Dataset
  steps: int


def eval_input(config: config_lib.Config, manifest: Dict[str, Any],
               split: str, batch_size: int,
               input_context: Optional[tf.distribute.InputContext] = None,
               endless: bool = False) -> EvalInput:
  """eval_dataset's batches and their number; `endless`: padding forever
  after them (infinite cardinality: no per-batch vote of the workers under
  MultiWorkerMirroredStrategy; see eval_stream.padded_batches)."""
  check_manifest(config, manifest)
  plan = eval_stream.plan(config.data.data_dir, manifest, split, batch_size,
                          input_context)
  return EvalInput(eval_stream.padded_batches(config, manifest, split, plan,
                                              endless), plan.steps)


def eval_dataset(config: config_lib.Config, manifest: Dict[str, Any],
                 split: str, batch_size: int,
                 input_context: Optional[tf.distribute.InputContext] = None
                 ) -> tf.data.Dataset:
  """One pass over a split in whole, equally shaped, padded batches.

  Dicts of `images` float32 [b, S, S, 3] (normalised; 'inception' data
  centre-cropped and resized), `labels` int32 [b] and `mask` float32 [b]: 1
  for a real image, 0 for padding (all-zero images, label 0). `batch_size` is
  the global batch; b is its share per replica when an input context is
  given. Each input pipeline (host) reads its own shard files, or its own
  records of a file when there are fewer files than pipelines
  (eval_stream.py), and pads them so that every pipeline yields the same
  number of whole batches; `sum(mask)` over all of them is exactly the
  split's size N.
  """
  return eval_input(config, manifest, split, batch_size,
                    input_context).dataset


# Errors that tf.data raises for a bad record: a corrupt file, an undecodable
# image, a failed shape or label check.
_INPUT_ERRORS = (tf.errors.DataLossError, tf.errors.InvalidArgumentError)


def is_input_error(error: tf.errors.OpError) -> bool:
  """Whether `error` can come from a bad record in the input pipeline."""
  return isinstance(error, _INPUT_ERRORS) and 'Iterator' in str(error)


def check_records(config: config_lib.Config, manifest: Dict[str, Any],
                  splits=records.SPLITS) -> None:
  """ValueError naming the first bad record of `splits`, if one is found.

  Splits of up to _FULL_SCAN_LIMIT records in all are scanned whole (a
  parallel pass: about a second per 10,000 small images); larger ones only
  their first _SAMPLED_RECORDS of each split, which catches a wrong size,
  format or label range (they affect whole preparations) in seconds
  instead of hours.
  """
  total = sum(int(manifest.get('counts', {}).get(split, 0))
              for split in splits)
  sample = None if total <= _FULL_SCAN_LIMIT else _SAMPLED_RECORDS
  record_checks.check_dataset(config.data.data_dir, manifest, splits,
                              max_records=sample)


def find_input_problem(config: config_lib.Config, manifest: Dict[str, Any],
                       splits, error: Optional[tf.errors.OpError] = None
                       ) -> Optional[ValueError]:
  """After a stream of these `splits` failed: the error naming the bad record.

  A corrupt record, an undecodable or wrongly sized image or a label out of
  range surfaces deep in tf.data, without the file's name. When `error`
  can come from the input (is_input_error), this rescans the splits
  (check_records) and returns the ValueError that names the shard and
  record, or None when nothing was found and the failure came from
  elsewhere (or lies beyond the sample of a large split:
  `record_checks.check_dataset(data_dir)` scans every record).
  """
  if error is not None and not is_input_error(error):
    return None
  try:
    check_records(config, manifest, splits)
  except ValueError as named:
    return named
  return None
