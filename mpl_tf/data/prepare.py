"""Prepares a data set for training (the library of `python prepare.py`).

Reads a source (a prepared TFDS data set, a folder of class sub-folders, or
an .npz of arrays; see `sources.py`), draws the labeled, unlabeled,
validation and test splits by seed from the labels alone (`splits.py`),
then streams the images once into TFRecord shards (`records.py`) and writes
`manifest.json` last (`dataset_writer.py`). The command line (prepare.py at
the repository root) reads its flags (flags/prepare_flags.py) into a
PrepareConfig and calls `prepare`; this module reads no flags.

`prepare` writes into a hidden sibling of `out_dir` (`.<name>.tmp-...`)
and puts it in place only when everything is written, so a failed or
interrupted run leaves the previous `out_dir` (if any) untouched. A run
killed outright (SIGKILL) leaves its sibling behind: the next `prepare` of
the same `out_dir` removes it before writing (and first puts back an
`out_dir` that the killed run had just moved aside), touching only the
names `storage.hidden_sibling` makes, of processes no longer running. Every path
may be on any file system TensorFlow reads (gs://...; see `storage.py`): a
local directory is renamed into place; elsewhere, where a directory rename
is a copy of each file, the old manifest is removed first and the new one
moved in last, so a reader (which trusts only a directory with a manifest)
never takes a half-written set. Bad flags, missing data or bad images end
with one message and exit status 2.

The writer, `dataset_writer.write_prepared`, is shared: the offline digit
sets (`offline.py`) are written by it too.
"""

import dataclasses
import io
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from mpl_tf import storage
from mpl_tf.data import array_source
from mpl_tf.data import dataset_writer
from mpl_tf.data import folder_source
from mpl_tf.data import records
from mpl_tf.data import sources
from mpl_tf.data import splits
from mpl_tf.data import tfds_source

SOURCES = ('tfds', 'folder', 'npz')
NORMALIZATIONS = ('auto', 'computed', 'cifar10', 'imagenet')
SPLIT_INDICES_NAME = 'split_indices.npz'
# What a directory may hold for --overwrite to replace it.
_PREPARED_SUFFIXES = ('.tfrecord', records.MANIFEST_NAME, SPLIT_INDICES_NAME)


class PrepareError(ValueError):
  """A preparation that cannot run as asked; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """Everything one preparation needs; built once from the CLI's flags."""
  # Source.
  source: Optional[str] = None          # 'tfds', 'folder' or 'npz'
  tfds_name: Optional[str] = None
  tfds_data_dir: str = '~/tensorflow_datasets'
  tfds_train_split: str = 'train'
  tfds_test_split: str = 'auto'         # 'auto', 'none' or a TFDS split
  train_dir: Optional[str] = None
  test_dir: Optional[str] = None
  npz_path: Optional[str] = None
  # Split rule; None keeps the rule's default (see splits.RULE_DEFAULTS).
  split_rule: str = 'cifar10_4k'
  variant: str = 'paper'
  seed: int = 0
  labeled_per_class: Optional[int] = None
  labeled_fraction: Optional[float] = None
  validation_per_class: Optional[int] = None
  num_validation: Optional[int] = None
  num_test: Optional[int] = None
  unlabeled_includes_labeled: Optional[bool] = None
  # Output.
  out_dir: Optional[str] = None
  dataset: Optional[str] = None         # default: the rule's name
  shard_size: int = 1024
  normalization: str = 'auto'
  overwrite: bool = False

  @property
  def dataset_name(self) -> str:
    """The name training matches `--dataset` against."""
    if self.dataset:
      return self.dataset
    if self.split_rule != 'custom':
      return self.split_rule
    return storage.split(self.out_dir or 'custom')[1]


_SOURCE_FLAGS = {'tfds': ('tfds_name',), 'folder': ('train_dir', 'test_dir'),
                 'npz': ('npz_path',)}
_REQUIRED_FLAGS = {'tfds': 'tfds_name', 'folder': 'train_dir',
                   'npz': 'npz_path'}


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise PrepareError(f'--{name}={value} is not one of '
                       f'{", ".join(choices)}; pass one of them.')


def validate(config: PrepareConfig) -> PrepareConfig:
  """PrepareError naming the flag and the fix; returns the config."""
  if config.source is None:
    raise PrepareError(f'Pass --source: one of {", ".join(SOURCES)}.')
  _choice('source', config.source, SOURCES)
  if not config.out_dir:
    raise PrepareError('Pass --out_dir, the directory to write the prepared '
                       'data set to (e.g. data/cifar10_4k).')
  required = _REQUIRED_FLAGS[config.source]
  if not getattr(config, required):
    raise PrepareError(f'--source={config.source} needs --{required}.')
  for other, names in _SOURCE_FLAGS.items():
    for name in names:
      if other != config.source and getattr(config, name):
        raise PrepareError(f'--{name} is for --source={other}, but '
                           f'--source={config.source}; drop it.')
  _choice('split_rule', config.split_rule, splits.SPLIT_RULES)
  _choice('variant', config.variant, splits.VARIANTS)
  _choice('normalization', config.normalization, NORMALIZATIONS)
  if config.variant == 'released_code' and config.split_rule != 'cifar10_4k':
    raise PrepareError('--variant=released_code exists for '
                       '--split_rule=cifar10_4k only.')
  if config.seed < 0:
    raise PrepareError(f'--seed={config.seed} must be >= 0.')
  if config.shard_size < 1:
    raise PrepareError(f'--shard_size={config.shard_size} must be >= 1.')
  if (config.split_rule == 'custom' and config.labeled_per_class is None and
      config.labeled_fraction is None):
    raise PrepareError('--split_rule=custom needs --labeled_per_class (images '
                       'per class) or --labeled_fraction (of each class).')
  for first, second in (('labeled_per_class', 'labeled_fraction'),
                        ('validation_per_class', 'num_validation')):
    if getattr(config, first) is not None and getattr(config,
                                                      second) is not None:
      raise PrepareError(f'Give --{first} or --{second}, not both.')
  try:
    splits.check_params(split_params(config))
  except ValueError as error:
    # Checked here, before a long first pass over the labels. The messages
    # start with the parameter, which is also the flag's name.
    raise PrepareError(f'--{error}') from None
  return config


def split_params(config: PrepareConfig) -> splits.SplitParams:
  """The rule's default sizes with the config's overrides."""
  return splits.rule_params(
      config.split_rule, labeled_per_class=config.labeled_per_class,
      labeled_fraction=config.labeled_fraction,
      validation_per_class=config.validation_per_class,
      num_validation=config.num_validation, num_test=config.num_test,
      unlabeled_includes_labeled=config.unlabeled_includes_labeled)


def resolve_normalization(normalization: str, split_rule: str,
                          source_name: str) -> str:
  """'auto' -> the released constants for CIFAR-10/ImageNet, else computed."""
  if normalization != 'auto':
    return normalization
  if split_rule == 'cifar10_4k' or source_name == 'cifar10':
    return 'cifar10'
  if split_rule == 'imagenet_10pct' or source_name.startswith('imagenet2012'):
    return 'imagenet'
  return 'computed'


def _open_source(config: PrepareConfig) -> sources.Source:
  if config.source == 'tfds':
    return tfds_source.open_tfds(config.tfds_name, config.tfds_data_dir,
                                 config.tfds_train_split,
                                 config.tfds_test_split)
  if config.source == 'folder':
    return folder_source.open_folder(config.train_dir, config.test_dir)
  return array_source.open_npz(config.npz_path)


def plan_splits(config: PrepareConfig, source: sources.Source
                ) -> Tuple[dataset_writer.SplitPlan, Dict[str, Any]]:
  """Draws the splits from the source's labels; returns (plan, params)."""
  params = split_params(config)
  train, test = source.train, source.test
  if test is not None and params.num_test:
    raise PrepareError(
        f'The source has a test split ({test.description}) and --num_test='
        f'{params.num_test} asks to hold one out of train; drop --num_test, '
        f'or drop the test split (--tfds_test_split=none, no --test_dir, no '
        f'test arrays).')
  if test is None and not params.num_test:
    raise PrepareError(
        'The source has no test split: give one (--test_dir, test arrays in '
        'the .npz, --tfds_test_split) or hold one out of train with '
        '--num_test=N.')
  if test is not None:
    bad = (test.labels < 0) | (test.labels >= source.num_classes)
    if bad.any():
      raise PrepareError(
          f'{test.description} has labels outside [0, {source.num_classes}) '
          f'(e.g. {test.labels[bad][0]}): it is not a labeled test split. '
          f'For imagenet2012 use --tfds_test_split=validation.')
  try:
    indices = splits.make(config.split_rule, train.labels, config.seed,
                          params, config.variant, train.positions,
                          source.num_classes)
  except ValueError as error:
    raise PrepareError(f'{config.split_rule} split of {train.description}: '
                       f'{error}') from None
  if not len(indices['validation']):
    raise PrepareError(
        f'The {config.split_rule} split of {train.description} has no '
        f'validation images, which model selection needs: pass '
        f'--validation_per_class=N (or --num_validation=N).')
  plan = {split: (train, indices[split]) for split in records.SPLITS}
  if test is not None:
    plan['test'] = (test, np.arange(len(test), dtype=np.int64))
  recorded = dataclasses.asdict(params)
  recorded['variant'] = config.variant
  if config.variant == 'released_code':
    recorded['file_order'] = ('tfds id' if train.positions is not None else
                              'source order')
  return plan, recorded


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
  if not tf.io.gfile.exists(out_dir):
    return
  if not tf.io.gfile.isdir(out_dir):
    raise PrepareError(f'--out_dir={out_dir} is a file; choose a directory.')
  entries = storage.listdir(out_dir)
  if not entries:
    return
  if not overwrite:
    raise PrepareError(f'--out_dir={out_dir} already exists and is not '
                       f'empty; pass --overwrite to replace the data set '
                       f'there, or choose another directory.')
  foreign = [entry for entry in entries
             if not entry.endswith(_PREPARED_SUFFIXES) and
             not records.is_temporary(entry)]
  if foreign:
    raise PrepareError(f'--out_dir={out_dir} holds files that are not part '
                       f'of a prepared data set ({sorted(foreign)[:5]}); '
                       f'refusing to replace it. Choose another directory.')


def _write_split_indices(out_dir: str, plan: dataset_writer.SplitPlan) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **{split: indices for split, (_, indices) in plan.items()})
  with tf.io.gfile.GFile(os.path.join(out_dir, SPLIT_INDICES_NAME),
                         'wb') as f:
    f.write(buffer.getvalue())


def prepare(config: PrepareConfig,
            log: Callable[[str], None] = dataset_writer.quiet
            ) -> Dict[str, Any]:
  """Runs one preparation; returns the manifest written to config.out_dir."""
  validate(config)
  out_dir = storage.absolute(config.out_dir)
  restored = storage.restore_replaced(out_dir)
  if restored:
    log(f'Put {out_dir} back from {restored}, where a killed run had moved '
        f'it while replacing it.')
  _check_out_dir(out_dir, config.overwrite)
  log(f'Reading labels of the {config.source} source...')
  source = _open_source(config)
  plan, params = plan_splits(config, source)
  log('Splits: ' + ', '.join(f'{split} {len(indices):,}'
                             for split, (_, indices) in plan.items()))
  normalization = resolve_normalization(config.normalization,
                                        config.split_rule, source.name)
  for path in storage.remove_interrupted(out_dir):
    log(f'Removed {path}, left by a killed run.')
  temporary_dir = storage.hidden_sibling(out_dir, 'tmp')
  try:
    tf.io.gfile.makedirs(temporary_dir)
    _write_split_indices(temporary_dir, plan)
    manifest = dataset_writer.write_prepared(
        temporary_dir, source, plan, dataset=config.dataset_name,
        split_rule=config.split_rule, seed=config.seed, params=params,
        shard_size=config.shard_size, normalization=normalization,
        extra={'split_indices_file': SPLIT_INDICES_NAME}, log=log)
    storage.replace_directory(temporary_dir, out_dir,
                              last=(records.MANIFEST_NAME,))
  finally:
    if tf.io.gfile.exists(temporary_dir):
      storage.rmtree(temporary_dir)
  log(f'Wrote {out_dir}: ' + ', '.join(
      f'{split} {count:,}' for split, count in manifest['counts'].items()) +
      f'; image_size {manifest["image_size"]}; train with '
      f'--dataset={manifest["dataset"]} --data_dir={out_dir}')
  return manifest
