"""Which records an input pipeline reads, and in which order, parsed.

A split's shards are the ones its manifest lists (shard_list.py); for
training each input pipeline reads its share of them (whole shards or a
record range, input_shares.py) as an endless stream that is reshuffled every
epoch by a seed and can start at any record, so a resumed run continues
with the data it would have seen, at the cost of one shuffle chunk, not of
the records before it. Evaluation reads the listed files once, in a fixed
order (pipeline.eval_dataset deals their records). Records leave as
(uint8 image, int32 label) pairs with their labels checked. Kept apart from
`pipeline.py`, which turns these pairs into the batches and views that the
steps take.
"""

from typing import Any, Dict, List

import tensorflow as tf

from mpl_tf import config as config_lib
from mpl_tf.data import augment
from mpl_tf.data import input_shares
from mpl_tf.data import records

AUTOTUNE = tf.data.AUTOTUNE
# Splits up to this many records are shuffled whole (the buffer holds encoded
# bytes, about 1 kB for a 32x32 PNG); larger ones use 16 batches, as released.
_WHOLE_SPLIT_SHUFFLE_LIMIT = 100_000
_SHUFFLE_BATCHES = 16
_FOREVER = 2**62  # Epochs of an endless stream.


def split_count(manifest: Dict[str, Any], split: str) -> int:
  """The manifest's record count of a split; ValueError if it has none."""
  count = manifest.get('counts', {}).get(split)
  if count is None:
    raise ValueError(f'The manifest has no count for split {split!r}; '
                     f'prepare the data set again.')
  return int(count)


def shuffle_buffer_size(num_records: int, batch_size: int) -> int:
  """The whole split when it is small, else min(num_records, 16 batches)."""
  if num_records <= _WHOLE_SPLIT_SHUFFLE_LIMIT:
    return max(num_records, 1)
  return min(num_records, _SHUFFLE_BATCHES * batch_size)


def _pipeline_pieces(config: config_lib.Config, manifest: Dict[str, Any],
                     split: str, input_context
                     ) -> List[input_shares.Piece]:
  """This input pipeline's share of a split (input_shares.py).

  The shards are the manifest's list (shard_list.py); the first pipeline
  checks them against the folder, and, with several pipelines, prints
  which scheme the split is shared by.
  """
  pipelines = 1 if input_context is None else input_context.num_input_pipelines
  pipeline_id = 0 if input_context is None else input_context.input_pipeline_id
  shards = records.split_shards(config.data.data_dir, split, manifest,
                                check_folder=pipeline_id == 0)
  if pipelines == 1:
    return [input_shares.Piece(shard.path, 0, shard.records)
            for shard in shards]
  if pipeline_id == 0:
    print(input_shares.describe(split, shards, pipelines), flush=True)
  return input_shares.pipeline_pieces(split, shards, pipelines, pipeline_id)


def _read_piece(path: tf.Tensor, skip: tf.Tensor,
                take: tf.Tensor) -> tf.data.Dataset:
  return tf.data.TFRecordDataset(path).skip(skip).take(take)


def _piece_tensors(pieces: List[input_shares.Piece]):
  """(paths, skips, takes) of the pieces, as string and int64 tensors."""
  return (tf.constant([piece.path for piece in pieces], tf.string),
          tf.constant([piece.skip for piece in pieces], tf.int64),
          tf.constant([piece.take for piece in pieces], tf.int64))


def _read(pieces: tf.data.Dataset, cycle_length: int) -> tf.data.Dataset:
  """Serialized records of (path, skip, take) pieces, in a fixed order."""
  if cycle_length == 1:
    return pieces.flat_map(_read_piece)
  return pieces.interleave(
      _read_piece, cycle_length=min(cycle_length, 16),
      num_parallel_calls=AUTOTUNE, deterministic=True)


def _stateless_permutation(values: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """`values` in an order that is a pure function of `seed` ([2] int64)."""
  keys = tf.random.stateless_uniform([tf.shape(values)[0]], seed)
  return tf.gather(values, tf.argsort(keys))


def _endless_records(pieces: List[input_shares.Piece], buffer_size: int,
                     seed: int, start_record: int) -> tf.data.Dataset:
  """Records epoch after epoch, each epoch shuffled by its own seed.

  Epoch e holds exactly the pieces' records: the pieces in a random order,
  cut into groups of consecutive pieces that hold about `buffer_size`
  records (all of them, when the share is small), each group read whole
  and randomly permuted; every draw is seeded by (seed, e) alone. So the
  stream from record r on is the same whether it starts at 0 or at r, which
  is how a resumed run continues with the data it would have seen. Starting
  at r costs no more than one group: the epoch is r // N and its order is
  drawn again; the groups before the one holding r are never opened (the
  pieces' record counts place r), and that group is read and permuted, and
  its records up to r dropped. tf.data's own shuffle cannot do this: its
  seed must be a Python value, not a function of the epoch.
  """
  num_pieces = len(pieces)
  total = sum(piece.take for piece in pieces)
  per_group = (num_pieces if buffer_size >= total else
               max(1, buffer_size * num_pieces // total))
  num_groups = -(-num_pieces // per_group)
  paths, skips, takes = _piece_tensors(pieces)
  first_epoch, first_offset = divmod(start_record, total)
  base_seed = tf.constant([seed, 0], tf.int64)

  def one_epoch(epoch):
    file_seed, chunk_seed = tf.unstack(
        augment.split_seed(augment.fold_seed(base_seed, epoch), 2))
    order = _stateless_permutation(tf.range(num_pieces, dtype=tf.int64),
                                   file_seed)
    group_sizes = tf.math.unsorted_segment_sum(
        tf.gather(takes, order), tf.range(num_pieces) // per_group,
        num_groups)
    ends = tf.cumsum(group_sizes)
    offset = tf.where(epoch == first_epoch, tf.constant(first_offset, tf.int64),
                      tf.constant(0, tf.int64))
    first_group = tf.searchsorted(ends, offset[None], side='right')[0]
    skip = offset - (ends[first_group] - group_sizes[first_group])

    def group(index):
      members = order[index * per_group:
                      tf.minimum((index + 1) * per_group, num_pieces)]
      chunk = _read(tf.data.Dataset.from_tensor_slices(
          (tf.gather(paths, members), tf.gather(skips, members),
           tf.gather(takes, members))), per_group).batch(total)
      return chunk.map(lambda records: _stateless_permutation(
          records, augment.fold_seed(chunk_seed, index))).unbatch()

    groups = tf.data.Dataset.range(tf.cast(first_group, tf.int64), num_groups)
    return groups.flat_map(group).skip(skip)

  return tf.data.Dataset.range(first_epoch, _FOREVER).flat_map(one_epoch)


def parsed_split(config: config_lib.Config, manifest: Dict[str, Any],
                 split: str, input_context=None, shuffle_batch_size: int = 0,
                 seed: int = 0, start_record: int = 0) -> tf.data.Dataset:
  """(uint8 image, int32 label) pairs: one pass in file order, or (with
  `shuffle_batch_size`) an endless shuffled stream from record `start_record`
  of this input pipeline on (evaluation reads its shares by eval_stream.py).

  Labels outside [0, num_classes) stop the stream with an error naming the
  split; the training loop then names the file
  (record_checks.check_split).
  """
  data_dir = config.data.data_dir
  if shuffle_batch_size:
    if split_count(manifest, split) == 0:
      raise ValueError(f'Split {split!r} in {data_dir!r} is empty; a '
                       f'training stream needs at least one image.')
    pieces = _pipeline_pieces(config, manifest, split, input_context)
    pipeline_count = sum(piece.take for piece in pieces)
    dataset = _endless_records(
        pieces, shuffle_buffer_size(pipeline_count, shuffle_batch_size), seed,
        start_record)
  else:
    if input_context is None:   # Every listed file, whole (take -1: all).
      pieces = [input_shares.Piece(path, 0, -1) for path in
                records.split_files(data_dir, split, manifest)]
    else:
      pieces = _pipeline_pieces(config, manifest, split, input_context)
    dataset = _read(tf.data.Dataset.from_tensor_slices(
        _piece_tensors(pieces)), len(pieces))
  return dataset.map(checked_parser(manifest, split, data_dir),
                     num_parallel_calls=AUTOTUNE)


def checked_parser(manifest: Dict[str, Any], split: str, data_dir: str):
  """serialized -> (uint8 image, label), the label checked against the
  manifest's classes (a device assert naming the split): training and
  evaluation streams parse alike."""
  image_size = manifest.get('image_size')
  num_classes = int(manifest['num_classes'])
  message = (f'a label outside [0, {num_classes}) in split {split!r} of '
             f'{data_dir!r}')

  def parse(serialized):
    image, label = records.parse_example(serialized, image_size, 3)
    checks = [tf.debugging.assert_non_negative(label, message=message),
              tf.debugging.assert_less(label, num_classes, message=message)]
    with tf.control_dependencies(checks):
      return image, tf.identity(label)

  return parse
