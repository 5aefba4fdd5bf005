"""Which records of a split each input pipeline (host) reads for training.

Pure arithmetic on the manifest's shard list (shard_list.py), so that any
host count can be checked here without a cluster. A pipeline's share is a
list of pieces, (shard file, records to skip, records to take); every record
of the split is in exactly one pipeline's share, and each pipeline's stream
reads each record of its share once per epoch (record_stream.py).

Two schemes, chosen per split and said in one log line:

* whole shards, dealt round robin (shard i to pipeline i mod P), when every
  pipeline gets the same number of shards (P divides the shard count) and
  the shards differ by at most one record (as the writer cuts them): the
  shares then differ by at most shards / P records, and no file is read in
  part. One pipeline always reads whole shards.
* record ranges otherwise: the split's records, in shard order, cut into P
  contiguous ranges of nearly equal size (they differ by at most one
  record), each read from the shards it spans. A pipeline opens at most two
  shards in part, and skipping into a shard's first one reads at most that
  one shard's head: the extra input is at most one shard per pipeline and
  epoch, never the whole split. Dealing whole shards when they do not come
  out even would give some hosts one shard more than others (126 shards on
  64 hosts: two hosts would see their images twice as often), and with
  fewer shards than hosts some would get none.

A split needs at least one record per pipeline; with fewer, each host's
share cannot be a stream, and the message names --input_sharding=global_batch
(every host reads the whole split).
"""

from typing import List, NamedTuple, Sequence

from mpl_tf.data import shard_list

WHOLE_SHARDS = 'whole shards'
RECORD_RANGES = 'record ranges'


class Piece(NamedTuple):
  """Records [skip, skip + take) of one shard file."""
  path: str
  skip: int
  take: int


def _sizes(shards: Sequence[shard_list.Shard]) -> List[int]:
  sizes = [shard.records for shard in shards]
  if any(size is None for size in sizes):
    raise ValueError('The record count of every shard must be known to share '
                     'a split between input pipelines; the manifest has no '
                     'count for this split. Prepare the data set again.')
  return sizes


def scheme(shards: Sequence[shard_list.Shard], num_pipelines: int) -> str:
  """WHOLE_SHARDS or RECORD_RANGES, as the module docstring says."""
  sizes = _sizes(shards)
  if num_pipelines == 1:
    return WHOLE_SHARDS
  if len(sizes) % num_pipelines == 0 and max(sizes) - min(sizes) <= 1:
    shares = [sum(sizes[i::num_pipelines]) for i in range(num_pipelines)]
    if min(shares) > 0:
      return WHOLE_SHARDS
  return RECORD_RANGES


def _check_enough(split: str, sizes: List[int], num_pipelines: int) -> None:
  if sum(sizes) < num_pipelines:
    raise ValueError(
        f'Split {split!r} has {sum(sizes)} records for {num_pipelines} input '
        f'pipelines (hosts): each needs at least one to stream. Pass '
        f'--input_sharding=global_batch (every host reads the whole split), '
        f'or use fewer hosts.')


def pipeline_pieces(split: str, shards: Sequence[shard_list.Shard],
                    num_pipelines: int, pipeline_id: int) -> List[Piece]:
  """The pieces pipeline `pipeline_id` of `num_pipelines` reads, in order."""
  sizes = _sizes(shards)
  _check_enough(split, sizes, num_pipelines)
  if scheme(shards, num_pipelines) == WHOLE_SHARDS:
    return [Piece(shard.path, 0, shard.records)
            for shard in shards[pipeline_id::num_pipelines]]
  ranges = shard_list.shard_sizes(sum(sizes), num_pipelines)
  first = sum(ranges[:pipeline_id])
  last = first + ranges[pipeline_id]
  pieces, shard_start = [], 0
  for shard, size in zip(shards, sizes):
    begin, end = max(first, shard_start), min(last, shard_start + size)
    if begin < end:
      pieces.append(Piece(shard.path, begin - shard_start, end - begin))
    shard_start += size
  return pieces


def share_sizes(split: str, shards: Sequence[shard_list.Shard],
                num_pipelines: int) -> List[int]:
  """Records in each pipeline's share."""
  return [sum(piece.take for piece in pipeline_pieces(
      split, shards, num_pipelines, index)) for index in range(num_pipelines)]


def describe(split: str, shards: Sequence[shard_list.Shard],
             num_pipelines: int) -> str:
  """The log line of the choice: the scheme and what each pipeline gets."""
  sizes = _sizes(shards)
  _check_enough(split, sizes, num_pipelines)
  chosen = scheme(shards, num_pipelines)
  if chosen == WHOLE_SHARDS:
    shares = [sum(sizes[i::num_pipelines]) for i in range(num_pipelines)]
    what = f'{len(sizes) // num_pipelines} shard(s) each'
  else:
    shares = shard_list.shard_sizes(sum(sizes), num_pipelines)
    dealt = [len(sizes[i::num_pipelines]) for i in range(num_pipelines)]
    what = (f'whole shards would deal {min(dealt)} to {max(dealt)} per '
            f'pipeline' if min(dealt) != max(dealt) else
            'the shards differ by more than one record')
  return (f'input: split {split!r}, {sum(sizes):,} records in {len(sizes)} '
          f'shard(s), over {num_pipelines} input pipelines: {chosen}, '
          f'{min(shares):,} to {max(shares):,} records per pipeline '
          f'({what}).')
