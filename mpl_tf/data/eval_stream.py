"""Which records of an evaluation split each host reads, padded and batched.

Every record is read (decoded) by one input pipeline (one host) only, and
every pipeline yields the same number of equally shaped batches, so the
replicas of all hosts run the same number of eval steps (their collectives
line up) and the mask counts each real example exactly once:

* by shard, when a split has at least as many shard files as there are
  pipelines: pipeline p of P reads files p, p + P, p + 2P, ... whole. No
  byte of the split is read twice across the pod.
* by record, when it has fewer files F than pipelines: pipeline p reads file
  p mod F and keeps every k-th of its records from the (p div F)-th on,
  where k is the number of pipelines sharing that file. Each record is
  decoded once, but each file's bytes are read by its k pipelines (about
  P / F times the split in all); prepare with at least as many shards as
  hosts (`--shard_size`) to read every byte once.

The shares need not be equal (5 files on 2 hosts: 3 and 2 files): every
pipeline pads its share with masked, all-zero examples to the largest
share, rounded up to whole batches of the host (`EvalPlan.steps`). The
record counts of the shards come from the manifest's count of the split and
the writer's rule (`records.shard_sizes`: contiguous, nearly equal pieces);
the evaluator checks that the counted examples add up to the manifest's.

`shares` is pure arithmetic, so any pod size can be simulated with fake
`tf.distribute.InputContext`s (tests/test_eval_stream.py).
"""

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from mpl_tf import config as config_lib
from mpl_tf.data import augment
from mpl_tf.data import record_stream
from mpl_tf.data import records

AUTOTUNE = tf.data.AUTOTUNE
_READ_CYCLE = 16  # Files read at once by one pipeline.


@dataclasses.dataclass(frozen=True)
class Share:
  """The records of a split that one input pipeline reads.

  The records of the shard files at `files` (positions in the split's
  sorted file list), of which every `every`-th from the `first`-th on is
  kept (`every` > 1 only when pipelines share a file); `real` records in all.
  """
  files: Tuple[int, ...]
  every: int
  first: int
  real: int


def shares(shard_sizes: Sequence[int], pipelines: int) -> List[Share]:
  """Every pipeline's share of a split whose shards hold `shard_sizes`."""
  num_files = len(shard_sizes)
  if num_files >= pipelines:
    return [Share(tuple(range(p, num_files, pipelines)), 1, 0,
                  sum(shard_sizes[p::pipelines])) for p in range(pipelines)]
  result = []
  for p in range(pipelines):
    file, first = p % num_files, p // num_files
    every = len(range(file, pipelines, num_files))
    result.append(Share((file,), every, first,
                        len(range(first, shard_sizes[file], every))))
  return result


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  """One pipeline's part of an evaluation.

  `paths`: its shard files; `share`: its records; `batch`: the per-replica
  batch; `batches`: the batches it yields (real ones, then padding);
  `steps`: eval steps per replica, the same on every replica of every host.
  """
  paths: Tuple[str, ...]
  share: Share
  batch: int
  batches: int
  steps: int


def plan(data_dir: str, manifest: Dict[str, Any], split: str,
         batch_size: int, input_context=None) -> EvalPlan:
  """This pipeline's EvalPlan for a global eval batch of `batch_size`."""
  count = manifest.get('counts', {}).get(split)
  if count is None:
    raise ValueError(f'The manifest has no count for split {split!r}; '
                     f'prepare the data set again.')
  # The manifest's shards and counts (shard_list.py), not a glob: files of
  # an earlier preparation are never read. No folder listing per evaluation.
  shards = records.split_shards(data_dir, split, manifest, check_folder=False)
  sizes = [shard.records for shard in shards]
  return plan_for_files([shard.path for shard in shards], int(count),
                        batch_size, input_context,
                        None if None in sizes else sizes)


def plan_for_files(files: Sequence[str], count: int, batch_size: int,
                   input_context=None,
                   sizes: Optional[Sequence[int]] = None) -> EvalPlan:
  """`plan` for a split of `count` records in the sorted shard `files`.

  `sizes`: the files' record counts; None: cut as the writer cuts
  (records.shard_sizes), for a set whose manifest lists no counts.
  """
  pipelines, pipeline_id, replicas = (
      (1, 0, 1) if input_context is None else
      (input_context.num_input_pipelines, input_context.input_pipeline_id,
       input_context.num_replicas_in_sync))
  if batch_size % replicas or replicas % pipelines:
    raise ValueError(f'eval_batch_size={batch_size} must be a multiple of the '
                     f'{replicas} replicas (on {pipelines} input pipelines).')
  all_shares = shares(list(sizes) if sizes is not None else
                      records.shard_sizes(count, len(files)), pipelines)
  host_batch = batch_size // pipelines
  steps = -(-max(share.real for share in all_shares) // host_batch)
  share = all_shares[pipeline_id]
  return EvalPlan(tuple(files[i] for i in share.files), share,
                  batch_size // replicas, steps * (replicas // pipelines),
                  steps)


def padded_batches(config: config_lib.Config, manifest: Dict[str, Any],
                   split: str, eval_plan: EvalPlan, endless: bool = False
                   ) -> tf.data.Dataset:
  """The plan's share in the eval view, padded, in per-replica batches.

  Dicts of `images` float32 [b, S, S, 3] (normalised; 'inception' data
  centre-cropped and resized), `labels` int32 [b] and `mask` float32 [b]
  (1 for a real image; padding is an all-zero image with label 0).
  `eval_plan.batches` batches, or (`endless`) padding forever after them:
  a dataset of infinite cardinality, whose distributed iterator skips the
  all-worker "any data left?" vote that a finite one holds at every
  `next` under MultiWorkerMirroredStrategy; the evaluator takes exactly
  `eval_plan.steps` batches per replica.

  Only `eval_plan.batch` must be a Python int (the static batch shape); the
  paths, share and batch count may be tensors, so a test can run a whole
  simulated pod's pipelines in one dataset.
  """
  data = config.data
  size = data.image_size
  share = eval_plan.share
  mean, std = manifest['mean'], manifest['std']
  parse = record_stream.checked_parser(manifest, split, data.data_dir)

  def to_example(serialized):
    image, label = parse(serialized)
    if data.crop == 'inception':
      image = augment.center_crop(image, size, data.eval_crop_fraction)
    image = augment.normalize(tf.cast(image, tf.float32), mean, std)
    return {'images': image, 'labels': label,
            'mask': tf.constant(1.0, tf.float32)}

  # Files in a fixed order (deterministic interleave); when pipelines share
  # a file, each keeps its own records before any is decoded.
  paths = tf.convert_to_tensor(eval_plan.paths, tf.string)
  real = tf.data.Dataset.from_tensor_slices(paths).interleave(
      tf.data.TFRecordDataset, cycle_length=_READ_CYCLE,
      num_parallel_calls=AUTOTUNE, deterministic=True)
  real = real.shard(share.every, share.first).map(
      to_example, num_parallel_calls=AUTOTUNE)
  # Padding is already "normalised": all zeros.
  padding = tf.data.Dataset.from_tensors({
      'images': tf.zeros([size, size, 3], tf.float32),
      'labels': tf.constant(0, tf.int32),
      'mask': tf.constant(0.0, tf.float32)})
  padded = eval_plan.batches * eval_plan.batch - share.real
  padding = padding.repeat() if endless else padding.repeat(padded)
  dataset = real.concatenate(padding).batch(eval_plan.batch,
                                            drop_remainder=True)
  if not endless:
    dataset = dataset.take(eval_plan.batches)
  return dataset.prefetch(AUTOTUNE)
