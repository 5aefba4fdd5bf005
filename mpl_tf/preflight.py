"""Pre-flight: everything a run checks before it writes anything.

A wrong setting must end with one message and an empty (or untouched)
model_dir, so before the first write the loop checks the data (manifest,
records, labels of every class), the strategy's batch split, the
model_dir's config (a model_dir resumes only its own configuration) and its
writability, and builds this worker's training input (whose sharding can
refuse a number of hosts). Under multi-worker the workers first compare
their configurations, then every worker checks and votes (cluster.agree), so
an error on any worker stops all of them with its message, and they compare
the checkpoints they see; the chief alone prepares offline data and writes
config.json.
"""

import os
import re
from typing import Any, Callable, Dict, Optional, Sequence

import tensorflow as tf

from mpl_tf import cluster
from mpl_tf import distribute
from mpl_tf import storage
from mpl_tf.config import Config, ConfigError
from mpl_tf.data import offline
from mpl_tf.data import pipeline
from mpl_tf.data import records

# Run fields that may change between a run and its resumption.
_RESUMABLE_RUN_FIELDS = (
    'mode', 'model_dir', 'strategy', 'tpu', 'cluster_start_timeout',
    'steps_per_loop', 'stop_check_steps',
    'checkpoint_every', 'keep_checkpoints', 'jit_compile', 'eval_every',
    'eval_batch_size', 'eval_median_last', 'eval_all_networks',
    'export_dir', 'checkpoint', 'predict_files', 'nonfinite',
    'nonfinite_skip_limit', 'deterministic')


def _comparable(config_dict: Dict[str, Any]) -> Dict[str, Any]:
  run = {k: v for k, v in config_dict.get('run', {}).items()
         if k not in _RESUMABLE_RUN_FIELDS}
  return {**config_dict, 'run': run}


def check_model_dir(config: Config) -> None:
  """Refuses a model_dir that holds a run of a different configuration.

  A field that a run of an older version did not have yet counts as its
  default, so such a run resumes unless the new field is set otherwise.
  """
  path = os.path.join(config.run.model_dir, 'config.json')
  if not tf.io.gfile.exists(path):
    return
  saved, wanted = _comparable(storage.read_json(path)), _comparable(config.to_dict())
  defaults = Config().to_dict()
  differences = []
  for group in sorted(set(saved) | set(wanted)):
    for field in sorted(set(saved.get(group, {})) | set(wanted.get(group, {}))):
      before = saved.get(group, {}).get(
          field, defaults.get(group, {}).get(field))
      now = wanted.get(group, {}).get(field)
      if before != now:
        differences.append(f'{group}.{field}: {before!r} -> {now!r}')
  if differences:
    raise ConfigError(
        f'model_dir {config.run.model_dir!r} holds a run of a different '
        f'configuration ({"; ".join(differences[:5])}'
        f'{"; ..." if len(differences) > 5 else ""}). Pass another '
        f'--model_dir, or delete that directory to start over.')


def check_data(config: Config, manifest: Dict[str, Any]) -> None:
  """Raises ValueError naming the bad split, record or class, and the fix.

  Runs before anything is written to model_dir: the manifest must fit the
  config, every class needs a labeled example (the supervised loss and the
  teacher's knowledge of it come from nowhere else), and the records must be
  readable, of the manifest's size and channels, with labels in range.
  """
  for split in ('validation', 'test'):
    if not manifest.get('counts', {}).get(split):
      raise ValueError(
          f'The data set in {config.data.data_dir!r} has no {split} images, '
          f'which training evaluates on. Prepare it again with a {split} '
          f'split: `python prepare.py ... ' +
          ('--validation_per_class=N` (or --num_validation=N)'
           if split == 'validation' else '--num_test=N` (or --test_dir)') +
          '; for an offline set, --num_validation / --num_test.')
  pipeline.check_manifest(config, manifest)
  data_dir = config.data.data_dir
  pipeline.check_records(config, manifest)
  counts = _labeled_class_counts(data_dir, manifest)
  empty = [index for index, count in enumerate(counts) if not count]
  if empty:
    names = manifest.get('class_names') or []
    shown = [f'{i} ({names[i]})' if i < len(names) else str(i)
             for i in empty[:10]]
    raise ValueError(
        f'The labeled split in {data_dir!r} has no example of class(es) '
        f'{", ".join(shown)}{", ..." if len(empty) > 10 else ""}; prepare the '
        f'data again with labeled examples of every class (e.g. a larger '
        f'--labeled_per_class), or drop the class from the data set.')


def _labeled_class_counts(data_dir: str, manifest: Dict[str, Any]):
  """Labeled examples per class: the manifest's, else counted from records.

  Every preparation writes `class_counts`; reading them costs nothing, while
  counting means reading the whole labeled split (ImageNet-10%: 128,000
  records) at every start. Data written by hand with records.write_split and
  a manifest without counts is counted from its records (labels only).
  """
  num_classes = int(manifest['num_classes'])
  recorded = manifest.get('class_counts', {}).get('labeled')
  if recorded is not None and len(recorded) == num_classes:
    return [int(count) for count in recorded]
  labels = tf.data.TFRecordDataset(records.split_files(data_dir, 'labeled'))
  return labels.map(lambda s: tf.one_hot(records.parse_encoded(s)[1],
                                         num_classes, dtype=tf.int64)
                    ).reduce(tf.zeros([num_classes], tf.int64),
                             lambda total, one: total + one).numpy().tolist()


def check_paths(config: Config) -> None:
  """Raises ConfigError naming the flag whose path TensorFlow cannot reach.

  Every path the modes read or write, probed once before any of them is
  used: an unknown scheme or a bucket without network or credentials is one
  message here, not an OpError from deep inside a later read.
  """
  run = config.run
  paths = [('model_dir', run.model_dir), ('data_dir', config.data.data_dir),
           ('export_dir', run.export_dir), ('checkpoint', run.checkpoint)]
  paths += [('predict_files', pattern.strip())
            for pattern in run.predict_files.split(',')]
  for flag, path in paths:
    if path:
      storage.check_reachable(path, flag)


def check_not_in_a_file(directory: str, flag: str) -> str:
  """Raises ConfigError if a local directory path runs into a file.

  Returns the nearest existing ancestor (the directory itself if it
  exists). Remote paths (gs://) are left to their first read or write.
  """
  if storage.has_scheme(directory):
    return directory
  path = storage.absolute(directory)
  while not tf.io.gfile.exists(path):
    path = os.path.dirname(path)
  if not tf.io.gfile.isdir(path):
    raise ConfigError(f'{flag} {directory!r} cannot be a directory: {path!r} '
                      f'is a file. Pass a --{flag} in a directory.')
  return path


def check_writable(model_dir: str) -> None:
  """Raises ConfigError unless model_dir can be created and written to.

  A local path is checked without writing: its nearest existing ancestor
  must be a directory this process may write to. Remote paths (gs://) are
  left to the first write, which `start_model_dir` turns into the same
  message.
  """
  if storage.has_scheme(model_dir):
    return
  path = check_not_in_a_file(model_dir, 'model_dir')
  # Permissions have no tf.io.gfile call; local paths only.
  if not os.access(path, os.W_OK | os.X_OK):
    raise ConfigError(f'model_dir {model_dir!r} is not writable ({path!r} '
                      f'does not allow this user to write). Pass a '
                      f'--model_dir you can write to.')


def start_model_dir(config: Config) -> None:
  """Creates model_dir and writes config.json: the run's first write.

  The chief's alone: the other workers of a cluster write nothing there.
  """
  model_dir = config.run.model_dir
  try:
    tf.io.gfile.makedirs(model_dir)
    storage.write_json(os.path.join(model_dir, 'config.json'),
                       config.to_dict())
  except (OSError, tf.errors.OpError) as error:
    message = getattr(error, 'message', None) or str(error)
    raise ConfigError(f'model_dir {model_dir!r} is not writable '
                      f'({message.strip()}). Pass a --model_dir you can '
                      f'write to.') from None


def check_batches(config: Config, strategy) -> None:
  distribute.check_batch_divides(strategy, 'labeled_batch_size',
                                 config.optim.labeled_batch_size)
  distribute.check_batch_divides(strategy, 'eval_batch_size',
                                 config.run.eval_batch_size)
  if config.finetune.steps:
    distribute.check_batch_divides(
        strategy, 'finetune_batch_size',
        config.finetune.batch_size or config.optim.labeled_batch_size)
  distribute.check_microbatches(config, strategy.num_replicas_in_sync)


# What a pre-flight check raises for a wrong setting (main.py shows these as
# one message, without a traceback).
_USER_ERRORS = (ConfigError, FileNotFoundError, ValueError)


def latest_steps(directories: Sequence[str]) -> Dict[str, int]:
  """{directory: step of its latest complete checkpoint, 0 if none}.

  The loop saves checkpoint N at step N (ckpt-N), and restores the one the
  state file names.
  """
  steps = {}
  for directory in directories:
    latest = tf.train.latest_checkpoint(directory)
    number = re.search(r'-(\d+)$', latest or '')
    steps[directory] = int(number.group(1)) if number else 0
  return steps


def check_and_start(config: Config, strategy,
                    checkpoint_dirs: Sequence[str] = (),
                    check_inputs: Optional[Callable] = None
                    ) -> Dict[str, Any]:
  """Checks data and config on every worker; the chief prepares and starts.

  A wrong setting fails here, before anything is written. Under
  multi-worker the workers first compare their whole configurations (one
  all-reduce); the chief alone prepares offline data, scans the records and
  writes config.json; every worker votes after each stage (cluster.agree),
  so an error on any worker stops all of them with its message; and they
  compare the latest checkpoints of `checkpoint_dirs` (the phases'), which
  a model_dir that is not truly shared shows as different steps.
  `check_inputs(manifest)` builds this worker's input pipelines, whose
  errors (e.g. too few files for the hosts) are user errors too.
  """
  cluster.check_same_config(strategy, config.to_dict())
  chief = cluster.is_chief(strategy)
  manifest, error = None, None
  try:
    check_paths(config)
    check_writable(config.run.model_dir)
    check_not_in_a_file(config.data.data_dir, 'data_dir')
    if chief:
      manifest = offline.ensure_prepared(config.data)
      check_data(config, manifest)
  except _USER_ERRORS as raised:
    error = raised
  cluster.agree(strategy, error)
  try:
    if manifest is None:
      # The chief prepared and checked the data before the vote.
      manifest = records.read_manifest(config.data.data_dir)
      pipeline.check_manifest(config, manifest)
    check_batches(config, strategy)
    check_model_dir(config)
    if check_inputs is not None:
      check_inputs(manifest)
  except _USER_ERRORS as raised:
    error = raised
  cluster.agree(strategy, error)
  cluster.check_same_steps(strategy, 'see checkpoints of',
                           latest_steps(checkpoint_dirs))
  if chief:
    start_model_dir(config)
  return manifest
