"""Which shard files make a split of a prepared set, and their record counts.

The manifest is written after every shard and is the one description a
reader trusts, never a glob of the folder: a folder can hold shards of an
earlier preparation (a copy that does not delete, such as `gsutil rsync`
without -d, after preparing again with another --shard_size), and reading
them too would duplicate records, break the resume arithmetic and make
evaluation counts inexact.

Where the list comes from, in order:

1. `manifest['shards'][split]`: every writer records it since issue 23,
   [{'file': name, 'records': n}, ...] in shard order.
2. Older prepared manifests have none but carry `shard_size` (every one
   since the first preparation did): the writer cut each split into
   `num_shards_for(count, shard_size)` shards of `shard_sizes(count, n)`
   records (`SplitWriter`, the only writer, cuts so), which names and counts
   them exactly.
3. A manifest written by hand (records.write_split + write_manifest) names
   neither: the shards on disk are the set, which must then be one complete
   set of one shard count; two shard counts make it ambiguous, which is an
   error (nothing tells which set is current). Their counts are taken as
   write_split cuts them (shard_sizes); shards cut otherwise would misplace
   a resumed stream, so write them with write_split or list them.

In cases 1 and 2 other shard files of the split in the folder are named in a
warning (once per process) and ignored: the manifest leaves no doubt which
set is meant, and refusing would stop a run over a harmless leftover. A
listed shard that is missing is an error (an incomplete copy).
"""

import os
import re
import sys
from typing import Any, Dict, List, NamedTuple, Optional

import tensorflow as tf

SHARD = re.compile(r'(?P<split>labeled|unlabeled|validation|test)-'
                   r'(?P<index>\d{5,})-of-(?P<total>\d{5,})\.tfrecord')
_SHOWN = 5   # Names shown in a message about many files.
_warned = set()   # (data_dir, split, extra names) already warned about.


class Shard(NamedTuple):
  """One shard file of a split: its path and record count (None: unknown)."""
  path: str
  records: Optional[int]


def shard_name(split: str, index: int, num_shards: int) -> str:
  """The file name of shard `index` of `num_shards` of a split."""
  return f'{split}-{index:05d}-of-{num_shards:05d}.tfrecord'


def shard_sizes(num_records: int, num_shards: int) -> List[int]:
  """Sizes of `num_shards` contiguous, nearly equal pieces (as array_split)."""
  base, extra = divmod(num_records, num_shards)
  return [base + (1 if index < extra else 0) for index in range(num_shards)]


def num_shards_for(num_records: int, shard_size: Optional[int]) -> int:
  """Shards needed so none holds more than `shard_size` records (>= 1)."""
  if shard_size is None:
    return 1
  if shard_size < 1:
    raise ValueError(f'shard_size={shard_size} must be at least 1.')
  return max(1, -(-num_records // shard_size))


def manifest_entries(split: str, sizes: List[int]) -> List[Dict[str, Any]]:
  """The manifest's list of a split's shards, as a writer made them."""
  return [{'file': shard_name(split, index, len(sizes)), 'records': size}
          for index, size in enumerate(sizes)]


def _shown(names: List[str]) -> str:
  more = f' and {len(names) - _SHOWN} more' if len(names) > _SHOWN else ''
  return ', '.join(names[:_SHOWN]) + more


def _on_disk(data_dir: str, split: str) -> List[str]:
  """Names of the split's shard files in `data_dir` (one listing)."""
  pattern = os.path.join(data_dir, f'{split}-*-of-*.tfrecord')
  names = (os.path.basename(path) for path in tf.io.gfile.glob(pattern))
  return sorted(name for name in names
                if (match := SHARD.fullmatch(name)) and
                match.group('split') == split)


def _described(split: str, manifest: Dict[str, Any]):
  """[(name, records)] the manifest gives (cases 1, 2), or None (case 3)."""
  count = manifest.get('counts', {}).get(split)
  listed = manifest.get('shards', {}).get(split)
  if listed is not None:
    entries = [(str(entry['file']), int(entry['records'])) for entry in listed]
    if count is not None and sum(n for _, n in entries) != int(count):
      raise ValueError(
          f'The manifest lists shards of {sum(n for _, n in entries)} '
          f'records for split {split!r} but counts {count}: it is damaged; '
          f'prepare the data set again.')
    return entries
  if 'shard_size' in manifest and count is not None:
    sizes = shard_sizes(int(count), num_shards_for(int(count),
                                                   manifest['shard_size']))
    return [(entry['file'], entry['records'])
            for entry in manifest_entries(split, sizes)]
  return None


def _one_set_on_disk(data_dir: str, split: str, present: List[str],
                     manifest: Dict[str, Any]):
  """Case 3: the one complete set of shards on disk, sized by the writer."""
  totals = sorted({int(SHARD.fullmatch(name).group('total'))
                   for name in present})
  if len(totals) > 1:
    raise ValueError(
        f'Split {split!r} in {data_dir!r} has shards of {len(totals)} '
        f'preparations (-of-{", -of-".join(f"{t:05d}" for t in totals)}) '
        f'and its manifest does not list the shards, so which set is '
        f'current is unknown. Remove the stale shards, or prepare the data '
        f'set again (python prepare.py writes the list).')
  total = totals[0]
  names = [shard_name(split, index, total) for index in range(total)]
  missing = sorted(set(names) - set(present))
  if missing:
    raise FileNotFoundError(
        f'Split {split!r} in {data_dir!r} lacks shards {_shown(missing)} of '
        f'its {total}: the copy is incomplete; copy it again or prepare the '
        f'data set again.')
  count = manifest.get('counts', {}).get(split)
  sizes = ([None] * total if count is None else
           shard_sizes(int(count), total))
  return list(zip(names, sizes))


def _warn_extra(data_dir: str, split: str, extra: List[str], log) -> None:
  key = (data_dir, split, tuple(extra))
  if key in _warned:
    return
  _warned.add(key)
  log(f'warning: {data_dir} holds {len(extra)} shard file(s) of split '
      f'{split!r} that its manifest.json does not list ({_shown(extra)}), '
      f'left by an earlier preparation; they are ignored. Mirror the set '
      f'(tpu_scripts/stage_data.sh deletes them) to silence this.')


def _print_to_stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def split_shards(data_dir: str, split: str, manifest: Dict[str, Any],
                 log=_print_to_stderr, check_folder: bool = True
                 ) -> List[Shard]:
  """The split's shards as the manifest describes them, in shard order.

  One listing of `data_dir` checks that every listed shard is there
  (FileNotFoundError naming the missing ones) and finds files the manifest
  does not list (a warning through `log`, once per process; they are not
  read). See the module docstring for manifests without a list.
  `check_folder=False` skips the listing when the manifest describes the
  shards: the input pipelines of a pod share one folder, which the first
  one checks (one client builds them all on a TPU pod slice, and would
  otherwise list the same folder once per host and split).
  """
  if not check_folder:
    described = _described(split, manifest)
    if described is not None:
      return [Shard(os.path.join(data_dir, name), records)
              for name, records in described]
  present = _on_disk(data_dir, split)
  if not present:
    raise FileNotFoundError(
        f'No TFRecord files for split {split!r} in {data_dir!r} (looked for '
        f'{os.path.join(data_dir, f"{split}-*-of-*.tfrecord")}). Prepare the '
        f'data set first: for an offline data set (mnist5k, digits) run '
        f'training with --dataset set to it and --data_dir={data_dir}, '
        f'which prepares it; for CIFAR-10, SVHN, ImageNet or your own images '
        f'run `python prepare.py --out_dir={data_dir} ...` (see '
        f'docs/data.md); from arrays in code, call '
        f'mpl_tf.data.records.write_split().')
  described = _described(split, manifest)
  if described is None:
    described = _one_set_on_disk(data_dir, split, present, manifest)
  else:
    listed, on_disk = {name for name, _ in described}, set(present)
    missing = [name for name, _ in described if name not in on_disk]
    if missing:
      raise FileNotFoundError(
          f'Split {split!r} in {data_dir!r} lacks {len(missing)} of the '
          f'{len(described)} shards its manifest.json lists '
          f'({_shown(missing)}): the copy is incomplete. Copy the data set '
          f'again (tpu_scripts/stage_data.sh) or prepare it again.')
    extra = [name for name in present if name not in listed]
    if extra:
      _warn_extra(data_dir, split, extra, log)
  return [Shard(os.path.join(data_dir, name), records)
          for name, records in described]
