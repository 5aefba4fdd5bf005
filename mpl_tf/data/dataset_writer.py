"""Writes a prepared data set: planned splits to shards, manifest last.

`write_prepared` is the shared writer of every prepared set: the
data-preparation command (`prepare.py`, which reads a source and draws the
splits) and the offline digit sets (`offline.py`) both hand it a source and
a plan of the four splits. It streams each source split once into the
TFRecord shards of `records.py`, computes the per-channel mean and std (or
takes the released constants), and writes `manifest.json` last. It is kept
apart from `prepare.py` because it needs none of the command's
configuration, validation or directory handling, and so that `offline.py`
does not depend on them.
"""

import contextlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from mpl_tf.data import records
from mpl_tf.data import sources

# Per-channel mean and std on the 0..255 scale, as the released code
# normalises CIFAR-10 and ImageNet (its constants are on the 0..1 scale).
NORMALIZATION_CONSTANTS = {
    'cifar10': ([0.491400 * 255, 0.482158 * 255, 0.4465309 * 255],
                [0.247032 * 255, 0.243485 * 255, 0.26159 * 255]),
    'imagenet': ([0.485 * 255, 0.456 * 255, 0.406 * 255],
                 [0.229 * 255, 0.224 * 255, 0.225 * 255]),
}
_PROGRESS_EVERY = 50_000

# One split's images: the source split they come from and their indices.
SplitPlan = Dict[str, Tuple[sources.SourceSplit, np.ndarray]]


class _RunningMeanStd:
  """Per-channel mean and std of uint8 images, in exact integer sums."""

  def __init__(self, channels: int = 3):
    self._sums = np.zeros(channels, np.int64)
    self._squares = np.zeros(channels, np.int64)
    self._count = 0

  def update(self, image: np.ndarray) -> None:
    pixels = image.reshape(-1, image.shape[-1]).astype(np.int64)
    self._sums += pixels.sum(axis=0)
    self._squares += np.square(pixels).sum(axis=0)
    self._count += pixels.shape[0]

  def result(self) -> Tuple[List[float], List[float]]:
    if not self._count:
      raise ValueError('No labeled or unlabeled pixels to compute the mean '
                       'and std from.')
    mean = self._sums / self._count
    variance = np.maximum(self._squares / self._count - np.square(mean), 0.0)
    return mean.tolist(), np.sqrt(variance).tolist()


def quiet(unused_message: str) -> None:
  """A log that prints nothing: the default of `write_prepared`."""


def _group_by_source(plan: SplitPlan
                     ) -> List[Tuple[sources.SourceSplit,
                                     List[Tuple[str, np.ndarray]]]]:
  groups = []
  for split, (source_split, indices) in plan.items():
    for group_split, entries in groups:
      if group_split is source_split:
        entries.append((split, indices))
        break
    else:
      groups.append((source_split, [(split, indices)]))
  return groups


def _image_size(shapes: set, complete: bool) -> Optional[int]:
  """The common square side, or None for mixed, non-square or unknown."""
  if complete and len(shapes) == 1:
    height, width = next(iter(shapes))
    if height == width:
      return int(height)
  return None


def write_prepared(out_dir: str, source: sources.Source, plan: SplitPlan, *,
                   dataset: str, split_rule: str, seed: int,
                   params: Dict[str, Any], shard_size: Optional[int] = None,
                   normalization: str = 'computed',
                   extra: Optional[Dict[str, Any]] = None,
                   log: Callable[[str], None] = quiet) -> Dict[str, Any]:
  """Streams the planned splits into shards of `out_dir`; manifest last.

  Each source split is read once: a sequential (TFDS) source in its own
  order, routing each record to its splits; a random-access one split by
  split in the plan's (seeded, class-mixed) order. The mean and std are
  computed over the labeled and unlabeled images (each image once) unless
  `normalization` names released constants.

  Args:
    out_dir: directory to write into; existing shards of the same names are
      replaced (the caller removes any others).
    source: where the images come from.
    plan: {split: (source split, indices)} for every split in records.SPLITS.
    dataset: the name training matches `--dataset` against.
    split_rule: the rule's name, recorded in the manifest.
    seed: the split seed, recorded in the manifest.
    params: the split parameters, recorded in the manifest.
    shard_size: records per shard at most (None: one shard per split).
    normalization: 'computed', 'cifar10' or 'imagenet'.
    extra: more manifest fields (they override the standard ones).
    log: called with progress lines.

  Returns:
    The manifest written.
  """
  if set(plan) != set(records.SPLITS):
    raise ValueError(f'The plan must have the splits {records.SPLITS}; got '
                     f'{sorted(plan)}.')
  train = source.train
  compute = normalization == 'computed'
  in_stats = np.zeros(len(train), bool)
  for split in ('labeled', 'unlabeled'):
    if plan[split][0] is train:
      in_stats[plan[split][1]] = True
  counted = np.zeros(len(train), bool)
  stats = _RunningMeanStd()
  shapes, complete = set(), True
  counts = {split: int(len(indices)) for split, (_, indices) in plan.items()}

  with contextlib.ExitStack() as stack:
    writers = {
        split: stack.enter_context(records.SplitWriter(
            out_dir, split, count, records.num_shards_for(count, shard_size),
            source.num_classes))
        for split, count in counts.items()}
    written = dict.fromkeys(counts, 0)

    def write(split, source_split, record):
      nonlocal complete
      writers[split].write(record.encoded, record.label)
      written[split] += 1
      if written[split] % _PROGRESS_EVERY == 0:
        log(f'  {split}: {written[split]:,} of {counts[split]:,}')
      if record.image is not None:
        shapes.add(record.image.shape[:2])
      elif source_split.image_shape is None:
        complete = False
      if (compute and source_split is train and in_stats[record.index] and
          not counted[record.index]):
        stats.update(record.image)
        counted[record.index] = True

    for source_split, entries in _group_by_source(plan):
      if source_split.image_shape is not None:
        shapes.add(tuple(source_split.image_shape))
      log(f'Writing {", ".join(s for s, _ in entries)} from '
          f'{source_split.description}')
      if source_split.sequential:
        masks = []
        for split, indices in entries:
          mask = np.zeros(len(source_split), bool)
          mask[indices] = True
          masks.append((split, mask))
        wanted = np.flatnonzero(np.any([m for _, m in masks], axis=0))
        for record in source_split.read(wanted, decode=compute):
          for split, mask in masks:
            if mask[record.index]:
              write(split, source_split, record)
      else:
        for split, indices in entries:
          for record in source_split.read(indices, decode=compute):
            write(split, source_split, record)
    shards = {split: writer.manifest_entries()
              for split, writer in writers.items()}

  if compute:
    mean, std = stats.result()
  else:
    mean, std = NORMALIZATION_CONSTANTS[normalization]
  class_counts = {
      split: np.bincount(source_split.labels[indices],
                         minlength=source.num_classes).tolist()
      for split, (source_split, indices) in plan.items()}
  manifest = {
      'schema_version': records.SCHEMA_VERSION,
      'dataset': dataset,
      'source': source.description,
      'source_details': source.details,
      'num_classes': source.num_classes,
      'image_size': _image_size(shapes, complete),
      'channels': 3,
      'counts': counts,
      'class_counts': class_counts,
      'mean': [float(value) for value in mean],
      'std': [float(value) for value in std],
      'normalization': normalization,
      'split_rule': split_rule,
      'seed': seed,
      'split_params': params,
      'split_sources': {
          split: 'train' if source_split is train else 'test'
          for split, (source_split, _) in plan.items()},
      'shard_size': shard_size,
      # What readers read: each split's shard files and their record counts.
      'shards': shards,
  }
  if source.class_names:
    manifest['class_names'] = source.class_names
  manifest.update(extra or {})
  records.write_manifest(out_dir, manifest)
  return manifest
