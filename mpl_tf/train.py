"""The training loop: owns time, checkpoints, summaries, evaluation, results.

`run(config)` lives through a whole experiment in `model_dir`:

1. MPL (teacher + student + EMA student) for `optim.num_steps` steps, in
   device loops of `steps_per_loop` steps (one `tf.function` running
   `tf.range` over `strategy.run`), with a checkpoint every `checkpoint_every`
   steps and an evaluation every `eval_every` steps: validation (which selects
   the best EMA student) and test (which is only reported).
2. Optionally, finetuning of the EMA student on the labeled images
   (`finetune.steps`), reported beside the un-finetuned student.
3. Optionally, a supervised-only baseline on the same labeled images with the
   same seed, schedule and step count (`run.supervised_baseline`).

Every phase resumes by itself from its latest checkpoint in `model_dir`: one
tf.train.Checkpoint holds the networks, the optimizers (slots and step
counters), the step, the h baseline and the dropout RNG states; the input
streams and pseudo-label draws are pure functions of (seed, step), so they
are rebuilt at the restored step, and a resumed run continues as if it had
never stopped. A model_dir holding a
run of another configuration is refused.

Before anything is written to model_dir, the data (manifest, records, labels
of every class), the strategy's batch split, the model_dir's config and its
writability are checked, so a wrong setting ends with one message and an
empty (or untouched) model_dir. A non-finite loss or gradient norm is caught
inside the step (health.NonFiniteGuard); the loop then stops or goes on as
`run.nonfinite` says, and never saves a checkpoint holding a NaN or Inf
(docs/reliability.md).
"""

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional

import keras
import tensorflow as tf

from mpl_tf import cluster
from mpl_tf import curves
from mpl_tf import device_loop
from mpl_tf import distribute
from mpl_tf import optim
from mpl_tf import storage
from mpl_tf.config import Config, ConfigError
from mpl_tf.data import augment
from mpl_tf.data import offline
from mpl_tf.data import pipeline
from mpl_tf.data import records
from mpl_tf.evaluate import Evaluator, evaluate_split, summarize
from mpl_tf.models import build_model, random_states
from mpl_tf.models import replica_distinct_randomness
from mpl_tf.health import NonFiniteGuard
from mpl_tf.mpl_step import MplStep
from mpl_tf.progress import Progress
from mpl_tf.supervised_step import SupervisedStep
from mpl_tf.uda_step import UdaStep

# Scalars shown on the progress line (TensorBoard gets all of them).
_SHOWN = ('teacher/supervised_loss', 'teacher/uda_loss',
          'teacher/uda_mask_rate', 'student/pseudo_label_loss',
          'student/labeled_loss_new', 'mpl/h', 'supervised/loss')
# Run fields that may change between a run and its resumption.
_RESUMABLE_RUN_FIELDS = (
    'mode', 'model_dir', 'strategy', 'tpu', 'steps_per_loop',
    'checkpoint_every', 'keep_checkpoints', 'jit_compile', 'eval_every',
    'eval_batch_size', 'eval_median_last', 'eval_all_networks',
    'export_dir', 'checkpoint', 'predict_files', 'nonfinite',
    'nonfinite_skip_limit', 'deterministic')
_HISTORY_FILE = 'eval_history.json'
_IMAGES_SHOWN = 4


class NonFiniteError(RuntimeError):
  """A loss or gradient became NaN or Inf under run.nonfinite='stop'."""


def write_json(path: str, payload) -> None:
  """Writes JSON to a temporary name, then renames: never half a file."""
  with tf.io.gfile.GFile(path + '.tmp', 'w') as f:
    f.write(json.dumps(payload, indent=2, sort_keys=True))
  tf.io.gfile.rename(path + '.tmp', path, overwrite=True)


def _read_json(path: str):
  with tf.io.gfile.GFile(path) as f:
    return json.loads(f.read())


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
  saved, wanted = _comparable(_read_json(path)), _comparable(config.to_dict())
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
          f'split: `python -m mpl_tf.data.prepare ... ' +
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


def check_not_in_a_file(directory: str, flag: str) -> str:
  """Raises ConfigError if a local directory path runs into a file.

  Returns the nearest existing ancestor (the directory itself if it
  exists). Remote paths (gs://) are left to their first read or write.
  """
  if storage.has_scheme(directory):
    return directory
  path = os.path.abspath(directory)
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
  left to the first write, which `_start_model_dir` turns into the same
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


def _start_model_dir(config: Config) -> None:
  """Creates model_dir and writes config.json: the run's first write.

  The chief's alone: the other workers of a cluster write nothing there.
  """
  model_dir = config.run.model_dir
  try:
    tf.io.gfile.makedirs(model_dir)
    write_json(os.path.join(model_dir, 'config.json'), config.to_dict())
  except (OSError, tf.errors.OpError) as error:
    message = getattr(error, 'message', None) or str(error)
    raise ConfigError(f'model_dir {model_dir!r} is not writable '
                      f'({message.strip()}). Pass a --model_dir you can '
                      f'write to.') from None


def all_finite(variables: List[tf.Variable]) -> bool:
  """Whether every float variable is finite: checked before every save."""
  floats = [v for v in variables if tf.as_dtype(v.dtype).is_floating]
  if not floats:
    return True
  return bool(tf.reduce_all(tf.stack([
      tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v)))
      for v in floats])).numpy())


def _variables_of(items) -> List[tf.Variable]:
  """The variables of checkpoint items (networks, optimizers, variables)."""
  found, seen = [], set()
  for item in items:
    if isinstance(item, (keras.Model, keras.optimizers.Optimizer)):
      variables = item.variables
    elif isinstance(item, (tf.Variable, keras.Variable)):
      variables = [item]
    else:
      continue
    for variable in variables:
      if id(variable) not in seen:
        seen.add(id(variable))
        found.append(variable)
  return found


def read_step(counter: tf.Variable) -> int:
  """A step counter's value on the host (also a mirrored variable's)."""
  return int(tf.convert_to_tensor(counter).numpy())


def remove_interrupted_writes(directory: str) -> List[str]:
  """Deletes what checkpoint writes killed midway left behind; returns them.

  tf.train.Checkpoint writes a checkpoint's shards under `<prefix>_temp/`
  and moves them into place only once complete, so such a directory is
  never part of a valid checkpoint (the state file never names it). A
  restarted run removes them, before anything writes, so that they do not
  pile up over many preemptions.
  """
  removed = []
  for path in sorted(tf.io.gfile.glob(os.path.join(directory, '*_temp'))):
    tf.io.gfile.rmtree(path)
    removed.append(path)
  return removed


def mpl_replica_step(mpl_step: MplStep) -> Callable:
  """The MPL step plus the diagnostics the loop logs."""

  def replica_step(batch):
    metrics, outputs = mpl_step(batch)
    metrics = dict(metrics)
    metrics['mpl/h_positive'] = tf.cast(metrics['mpl/h'] > 0, tf.float32)
    if 'unlabeled_labels' in batch:
      correct = tf.equal(outputs['pseudo_label_ids'],
                         tf.cast(batch['unlabeled_labels'], tf.int32))
      metrics['student/pseudo_label_accuracy'] = tf.reduce_mean(
          tf.cast(correct, tf.float32))
    return metrics

  return replica_step


class _Phase:
  """One training phase: its step, state, checkpoints and summaries."""

  def __init__(self, name: str, config: Config, strategy, manifest,
               replica_step: Callable, step_counter: tf.Variable,
               checkpoint_items: Dict[str, Any], dataset_fn: Callable,
               num_steps: int, splits, directory: str, models,
               guard: NonFiniteGuard, stop: cluster.StopRequest):
    self.name, self.config, self.strategy = name, config, strategy
    self.guard, self.stop = guard, stop
    self._saved_variables = _variables_of(checkpoint_items.values())
    self.manifest, self.num_steps, self.splits = manifest, num_steps, splits
    self.step_counter = step_counter
    self.directory = directory
    # dataset_fn(input_context, start_step): the stream from that step on.
    # The streams are pure functions of (seed, step), so a resumed run
    # rebuilds its input where it stopped instead of saving the iterators.
    self.dataset_fn = dataset_fn
    states = random_states(*models)
    self.checkpoint = tf.train.Checkpoint(**checkpoint_items,
                                          random_states=states)
    self.checkpoints = cluster.Checkpoints(
        strategy, self.checkpoint, os.path.join(directory, 'checkpoints'),
        config.run.keep_checkpoints, step_counter)
    self.loop = device_loop.make_train_loop(
        strategy, replica_distinct_randomness(replica_step, states),
        config.run.jit_compile)
    self.writer = cluster.summary_writer(
        strategy, os.path.join(directory, 'logs', 'train'))
    self._restored = False
    # The first batch's views go to TensorBoard once per run, from the main
    # phase; finetuning and the baseline only repeat the labeled view.
    self.write_images = True

  def restore(self) -> int:
    """Restores the latest checkpoint (once), if any; returns the step."""
    latest = self.checkpoints.latest
    if not self._restored and cluster.is_chief(self.strategy):
      for path in remove_interrupted_writes(self.checkpoints.directory):
        print(f'{self.name}: removed {path}, left by a checkpoint write '
              f'that was killed midway')
    if latest and not self._restored:
      self._restored = True
      self.checkpoint.restore(latest).assert_existing_objects_matched()
      print(f'{self.name}: resumed from {latest} at step '
            f'{read_step(self.step_counter)}')
    return read_step(self.step_counter)

  def _write_images(self) -> None:
    """A few training images of every view, as the networks see them.

    Drawn from a stream of _IMAGES_SHOWN-image batches, not from the run's
    own: one global batch of the large presets is hundreds of gigabytes.
    """
    if not cluster.is_chief(self.strategy):
      return
    batch = next(iter(self.dataset_fn(None, 0, _IMAGES_SHOWN)))
    mean = tf.constant(self.manifest['mean'], tf.float32)
    std = tf.constant(self.manifest['std'], tf.float32)
    with self.writer.as_default():
      for key in ('labeled_images', 'unlabeled_images_ori',
                  'unlabeled_images_aug'):
        if key in batch:
          images = batch[key][:_IMAGES_SHOWN] * std + mean
          tf.summary.image(f'inputs/{key}', images / augment.MAX_PIXEL,
                           step=0, max_outputs=_IMAGES_SHOWN)

  def train(self, on_eval: Optional[Callable] = None,
            later_steps: float = 0.0) -> Dict[str, float]:
    """Runs the remaining steps; returns the last loop's mean metrics.

    `later_steps`: the phases after this one, in steps of this one (by
    their cost), which the progress line's ETA includes.
    """
    run = self.config.run
    step = self.restore()
    if step == 0 and self.write_images:
      self._write_images()
    progress = Progress(self.name, self.num_steps, run.steps_per_loop,
                        start_step=step, later_steps=later_steps)
    iterator = iter(self.strategy.distribute_datasets_from_function(
        lambda context: self.dataset_fn(context, step)))
    metrics = {}
    while step < self.num_steps:
      count = min(run.steps_per_loop, self.num_steps - step)
      try:
        metrics = {k: float(v) for k, v in
                   self.loop(iterator, tf.constant(count)).items()}
      except tf.errors.OpError as error:
        problem = pipeline.find_input_problem(self.config, self.manifest,
                                              self.splits, error)
        if problem is None:
          raise
        raise problem from error
      step = read_step(self.step_counter)
      skipped = read_step(self.guard.skipped_steps)
      with self.writer.as_default():
        for name, value in metrics.items():
          tf.summary.scalar(name, value, step=step)
        tf.summary.scalar('health/skipped_steps', skipped, step=step)
      progress.update(step, {k: v for k, v in metrics.items() if k in _SHOWN})
      self._check_finite(step, skipped, metrics)
      stopping = self.stop.requested()
      if (stopping or step % run.checkpoint_every == 0 or
          step == self.num_steps):
        self._save(step)
      if stopping:
        self.writer.flush()
        raise cluster.StopRequested(
            f'{self.name}: stopped by a stop request (SIGTERM) at step '
            f'{step} of {self.num_steps}, after saving {self._last_checkpoint()}'
            f'. Run the same command again to resume from there.')
      if on_eval and run.eval_every and step % run.eval_every == 0:
        on_eval(step)
    progress.close()
    self.writer.flush()
    return metrics

  def _save(self, step: int) -> None:
    """A checkpoint of the state at `step`, never one holding NaN or Inf."""
    if not all_finite(self._saved_variables):
      raise NonFiniteError(
          f'{self.name}: the state at step {step} holds a NaN or Inf '
          f'although every checked loss and gradient norm was finite; '
          f'nothing was saved, {self._last_checkpoint()}.')
    self.checkpoints.save(step)

  def _last_checkpoint(self) -> str:
    latest = self.checkpoints.latest
    return (f'the last checkpoint is {latest}' if latest else
            'and there is no checkpoint yet')

  def _check_finite(self, step: int, skipped: int,
                    metrics: Dict[str, float]) -> None:
    """After a device loop: stops, or reports skipped steps, per policy."""
    if not metrics.get('health/nonfinite'):
      return
    if self.guard.policy == 'stop':
      self.writer.flush()
      raise NonFiniteError(
          f'{self.name}: non-finite value (NaN or Inf) at '
          f'{self.guard.describe()}; the run stopped without saving it, '
          f'{self._last_checkpoint()}. {self._what_next()}')
    in_a_row = read_step(self.guard.consecutive_skipped)
    if in_a_row >= self.config.run.nonfinite_skip_limit:
      self.writer.flush()
      raise NonFiniteError(
          f'{self.name}: the last {in_a_row} steps (up to step {step}) were '
          f'all non-finite and skipped (--nonfinite_skip_limit='
          f'{self.config.run.nonfinite_skip_limit}; the first at '
          f'{self.guard.describe()}): the state they start from is '
          f'itself broken, e.g. weights that one huge but finite update made '
          f'so large that every forward pass overflows, and its networks '
          f'would score 0 (NaN outputs); {self._last_checkpoint()}, which '
          f'may hold that state. {self._what_next(broken=True)}')
    print(f'{self.name}: {skipped} non-finite step(s) skipped so far '
          f'(the first at {self.guard.describe()}).')

  def _what_next(self, broken: bool = False) -> str:
    """The advice after a non-finite stop, which must fit check_model_dir.

    Other learning rates or clipping are another configuration, which the
    same model_dir refuses (it holds this run's config.json): the advice
    says what to do with that directory.
    """
    model_dir, latest = self.config.run.model_dir, self.checkpoints.latest
    advice = (f'Lower learning rates or --grad_clip_norm are another '
              f'configuration, which model_dir {model_dir!r} refuses (it '
              f'resumes only its own): ')
    if self.name == self.config.run.algorithm and not latest:
      advice += (f'it holds no checkpoint yet, only this attempt\'s '
                 f'config.json and logs, so delete it (rm -r {model_dir}) or '
                 f'pass another --model_dir for them')
    else:
      advice += ('pass another --model_dir for them (or delete this one to '
                 'start over)')
    advice += '; check the data'
    if not broken:
      advice += ('; or run the same command with --nonfinite=skip to ' +
                 ('go on from the last checkpoint' if latest else
                  'start again') + ', leaving such steps out')
    return advice + '.'


class _Evaluations:
  """Validation and test evaluations of the networks, and their history.

  The history (of the selected network, e.g. the EMA student) survives restarts
  in model_dir/eval_history.json; the best-on-validation network is kept in
  model_dir/checkpoints/best by its own CheckpointManager.
  """

  def __init__(self, config: Config, strategy, manifest, selected, directory,
               others: Optional[Dict[str, keras.Model]] = None):
    self.config, self.strategy, self.manifest = config, strategy, manifest
    self.evaluator = Evaluator(strategy)
    self.selected = selected
    # Validated too (run.eval_all_networks), for the curves alone.
    self.others = others if config.run.eval_all_networks else {}
    self.history_path = os.path.join(directory, _HISTORY_FILE)
    self.history = []
    self.best = cluster.Checkpoints(
        strategy, tf.train.Checkpoint(ema_student=selected),
        os.path.join(directory, 'checkpoints', 'best'), max_to_keep=1,
        checkpoint_name='best')
    self.writer = cluster.summary_writer(
        strategy, os.path.join(directory, 'logs', 'eval'))

  def load_history(self, restored_step: int) -> None:
    if tf.io.gfile.exists(self.history_path):
      self.history = [entry for entry in _read_json(self.history_path)
                      if entry['step'] <= restored_step]

  def evaluate(self, model: keras.Model, split: str) -> Dict[str, float]:
    return evaluate_split(self.evaluator, self.config, self.manifest, model,
                          split)

  def record(self, step: int) -> Dict[str, Any]:
    """Evaluates the selected network on both splits; keeps the best."""
    entry = {'step': step,
             'validation': self.evaluate(self.selected, 'validation'),
             'test': self.evaluate(self.selected, 'test')}
    others = {name: self.evaluate(model, 'validation')['top1']
              for name, model in self.others.items()}
    best_so_far = max((e['validation']['top1'] for e in self.history),
                      default=-1.0)
    self.history = [e for e in self.history if e['step'] != step] + [entry]
    if entry['validation']['top1'] > best_so_far:
      self.best.save(step)
    cluster.chief_only(self.strategy, write_json, self.history_path,
                       self.history)
    with self.writer.as_default():
      for split in ('validation', 'test'):
        for key in ('top1', 'top5', 'loss'):
          tf.summary.scalar(f'{split}/{key}', entry[split][key], step=step)
      for name, top1 in others.items():
        tf.summary.scalar(f'validation/top1_{name}', top1, step=step)
    print(f'  step {step}: {self.selected.name} top-1 validation '
          f'{entry["validation"]["top1"]:.4f}, test {entry["test"]["top1"]:.4f}'
          + ''.join(f'; {name} validation {top1:.4f}'
                    for name, top1 in others.items()))
    return entry


def validation_curve(config: Config, strategy, manifest, model: keras.Model,
                     directory: str) -> Optional[Callable]:
  """A phase's on_eval logging `model`'s validation top-1, or None.

  For the finetuning and supervised phases under run.eval_all_networks: their
  curves in curves.png (the networks are evaluated on both splits at the
  end either way).
  """
  if not config.run.eval_all_networks:
    return None
  evaluator = Evaluator(strategy)
  writer = cluster.summary_writer(strategy, os.path.join(directory, 'logs',
                                                         'eval'))

  def on_eval(step: int) -> None:
    top1 = evaluate_split(evaluator, config, manifest, model,
                          'validation')['top1']
    with writer.as_default():
      tf.summary.scalar('validation/top1', top1, step=step)
    writer.flush()

  return on_eval


def _dataset_fn(config: Config, manifest, kind: str, batch_size: int = 0):
  """stream(input_context, start_step, small_batch=None): a phase's input.

  `small_batch` gives the same kind of stream in batches of that many
  labeled images (and as many unlabeled ones), for image summaries.
  """

  def stream(context, step, small_batch: Optional[int] = None):
    if kind == 'mpl':
      small = config if small_batch is None else dataclasses.replace(
          config, optim=dataclasses.replace(
              config.optim, labeled_batch_size=small_batch, uda_ratio=1))
      return pipeline.train_dataset(small, manifest, context, step)
    return pipeline.labeled_dataset(config, manifest,
                                    small_batch or batch_size, context, step)

  return stream


def _check_batches(config: Config, strategy) -> None:
  distribute.check_batch_divides(strategy, 'labeled_batch_size',
                                 config.optim.labeled_batch_size)
  distribute.check_batch_divides(strategy, 'eval_batch_size',
                                 config.run.eval_batch_size)
  if config.finetune.steps:
    distribute.check_batch_divides(
        strategy, 'finetune_batch_size',
        config.finetune.batch_size or config.optim.labeled_batch_size)


def _supervised_phase(name: str, config: Config, strategy, manifest,
                      model: keras.Model, optimizer, num_steps: int,
                      batch_size: int, weight_decay_config, directory: str,
                      stop: cluster.StopRequest, model_key: str = 'model'):
  step = SupervisedStep(model, optimizer, weight_decay_config,
                        config.mpl.label_smoothing, batch_size,
                        nonfinite=config.run.nonfinite)
  return _Phase(
      name, config, strategy, manifest, step, optimizer.iterations,
      {model_key: model, 'optimizer': optimizer,
       'health': step.guard.checkpoint_item()},
      _dataset_fn(config, manifest, 'supervised', batch_size), num_steps,
      ('labeled',), directory, [model], step.guard, stop)


@dataclasses.dataclass
class _Training:
  """What run() trains: its phase, step counter and networks to report."""
  phase: _Phase
  step_counter: tf.Variable
  networks: Dict[str, keras.Model]   # reported at the end, by name
  selected: keras.Model              # selected on validation, finetuned, served
  # Validated at every evaluation under run.eval_all_networks (curves.png).
  others: Dict[str, keras.Model] = dataclasses.field(default_factory=dict)


def _build_training(config: Config, strategy, manifest, build,
                    stop: cluster.StopRequest) -> _Training:
  """The phase of `run.algorithm`, built in the strategy's scope."""
  algorithm, optim_cfg = config.run.algorithm, config.optim
  model_dir = config.run.model_dir
  batches = dict(global_labeled_batch=optim_cfg.labeled_batch_size,
                 global_unlabeled_batch=config.unlabeled_batch_size)
  teacher_lr, student_lr = optim.learning_rates(optim_cfg)
  if algorithm in ('mpl', 'pseudo_labels'):
    # pseudo_labels is the MPL step with mpl_weight = uda_weight = 0
    # (config.validate checks): a teacher trained on the labels alone.
    teacher, student, ema_student = (build('teacher'), build('student'),
                                     build('ema_student'))
    ema_student.set_weights(student.get_weights())
    step = MplStep(
        config.mpl, optim_cfg, teacher, student,
        optim.make_optimizer(teacher_lr, optim_cfg, 'teacher_optimizer',
                             teacher),
        optim.make_optimizer(student_lr, optim_cfg, 'student_optimizer',
                             student),
        ema_student=ema_student, seed=config.run.seed,
        nonfinite=config.run.nonfinite, **batches)
    phase = _Phase(
        algorithm, config, strategy, manifest, mpl_replica_step(step),
        step.step, step.checkpoint_items(), _dataset_fn(config, manifest, 'mpl'),
        optim_cfg.num_steps, ('labeled', 'unlabeled'), model_dir,
        [teacher, student, ema_student], step.guard, stop)
    networks = {f'{algorithm}_ema_student': ema_student,
                f'{algorithm}_student': student,
                f'{algorithm}_teacher': teacher}
    return _Training(phase, step.step, networks, ema_student,
                     {'student': student, 'teacher': teacher})
  if algorithm == 'uda':
    model, ema_model = build('uda'), build('uda_ema')
    ema_model.set_weights(model.get_weights())
    step = UdaStep(config.mpl, optim_cfg, model,
                   optim.make_optimizer(teacher_lr, optim_cfg, 'optimizer',
                                        model),
                   ema_model=ema_model, nonfinite=config.run.nonfinite,
                   **batches)
    phase = _Phase(
        'uda', config, strategy, manifest, step, step.step,
        step.checkpoint_items(), _dataset_fn(config, manifest, 'mpl'),
        optim_cfg.num_steps, ('labeled', 'unlabeled'), model_dir,
        [model, ema_model], step.guard, stop)
    return _Training(phase, step.step, {'uda_ema': ema_model, 'uda': model},
                     ema_model, {'uda': model})
  if algorithm == 'supervised':
    model = build('supervised')
    optimizer = optim.make_optimizer(teacher_lr, optim_cfg, 'optimizer', model)
    phase = _supervised_phase(
        'supervised', config, strategy, manifest, model, optimizer,
        optim_cfg.num_steps, optim_cfg.labeled_batch_size, optim_cfg,
        model_dir, stop, model_key='ema_student')
    return _Training(phase, optimizer.iterations, {'supervised': model},
                     model)
  raise ConfigError(f'algorithm={algorithm!r} is not mpl, pseudo_labels, uda '
                    f'or supervised.')


# What a pre-flight check raises for a wrong setting (main.py shows these as
# one message, without a traceback).
_USER_ERRORS = (ConfigError, FileNotFoundError, ValueError)


def _preflight(config: Config, strategy) -> Dict[str, Any]:
  """Checks data and config on every worker; the chief prepares and starts.

  A wrong setting fails here, before anything is written. Under
  multi-worker the chief alone prepares offline data, scans the records and
  writes config.json; every worker votes after each stage (cluster.agree),
  so an error on any worker stops all of them with its message.
  """
  chief = cluster.is_chief(strategy)
  manifest, error = None, None
  try:
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
    _check_batches(config, strategy)
    check_model_dir(config)
  except _USER_ERRORS as raised:
    error = raised
  cluster.agree(strategy, error)
  if chief:
    _start_model_dir(config)
  return manifest


def run(config: Config) -> Dict[str, Any]:
  """Trains, finetunes and evaluates; writes config.json and results.json.

  A SIGTERM ends the run at the next device-loop boundary, after a
  checkpoint (cluster.StopRequested); running it again resumes there.
  """
  # The strategy before any TensorFlow op: MultiWorkerMirroredStrategy
  # configures the collective ops at program start-up, and refuses after.
  strategy = distribute.get_strategy(config.run)
  if config.run.deterministic:
    tf.config.experimental.enable_op_determinism()
    # keras-cv's augmentation layers ask for the global generator when they
    # are built (they draw from stateless seeds afterwards); under op
    # determinism it must be set explicitly first.
    tf.random.set_global_generator(
        tf.random.Generator.from_seed(config.run.seed))
  manifest = _preflight(config, strategy)
  with cluster.StopRequest(strategy) as stop:
    return _run(config, strategy, manifest, stop)


def _run(config: Config, strategy, manifest,
         stop: cluster.StopRequest) -> Dict[str, Any]:
  run_cfg, optim_cfg = config.run, config.optim
  model_dir = run_cfg.model_dir
  num_classes, image_size = manifest['num_classes'], config.data.image_size
  print(f'data: {config.data.dataset} in {config.data.data_dir}: ' +
        ', '.join(f'{split} {manifest["counts"][split]}'
                  for split in ('labeled', 'unlabeled', 'validation', 'test')))
  print(f'strategy: {type(strategy).__name__} with '
        f'{strategy.num_replicas_in_sync} replica(s)' +
        (f'; worker {cluster.worker_id(strategy)}'
         f'{" (chief)" if cluster.is_chief(strategy) else ""}'
         if cluster.is_multi_worker(strategy) else ''))

  keras.utils.set_random_seed(run_cfg.seed)
  build = lambda name: build_model(config.model, num_classes, image_size, name)
  with strategy.scope():
    training = _build_training(config, strategy, manifest, build, stop)
  print(f'{run_cfg.algorithm}: {config.model.name}, '
        f'{training.selected.count_params():,} parameters per network')

  evaluations = _Evaluations(config, strategy, manifest, training.selected,
                             model_dir, training.others)
  evaluations.load_history(training.phase.restore())
  costs = phase_costs(config)
  start = time.time()
  training.phase.train(evaluations.record, sum(costs[1:]) / costs[0] *
                       optim_cfg.num_steps if costs[0] else 0.0)
  timings = {'train_seconds': time.time() - start}
  final_step = read_step(training.step_counter)
  if not evaluations.history or evaluations.history[-1]['step'] != final_step:
    evaluations.record(final_step)

  models = dict(training.networks)
  results: Dict[str, Any] = {}
  if config.finetune.steps:
    finetuned, seconds = _finetune(config, strategy, manifest,
                                   training.selected, build, stop,
                                   costs[2] / costs[1] if costs[1] else 0.0)
    models[f'{next(iter(training.networks))}_finetuned'] = finetuned
    timings['finetune_seconds'] = seconds
  if run_cfg.supervised_baseline and run_cfg.algorithm != 'supervised':
    keras.utils.set_random_seed(run_cfg.seed)
    with strategy.scope():
      supervised = build('supervised')
      supervised_lr, _ = optim.learning_rates(optim_cfg)
      phase = _supervised_phase(
          'supervised', config, strategy, manifest, supervised,
          optim.make_optimizer(supervised_lr, optim_cfg,
                               'supervised_optimizer', supervised),
          run_cfg.supervised_steps or optim_cfg.num_steps,
          optim_cfg.labeled_batch_size, optim_cfg,
          os.path.join(model_dir, 'supervised'), stop)
      phase.write_images = False
    start = time.time()
    phase.train(validation_curve(config, strategy, manifest, supervised,
                                 os.path.join(model_dir, 'supervised')))
    timings['supervised_seconds'] = time.time() - start
    models['supervised'] = supervised

  for name, model in models.items():
    if model is training.selected:
      # Just evaluated at the final step: the last history entry.
      last = evaluations.history[-1]
      results[name] = {split: last[split] for split in ('validation', 'test')}
    else:
      results[name] = {split: evaluations.evaluate(model, split)
                       for split in ('validation', 'test')}
  results['selected_history'] = summarize(evaluations.history,
                                          run_cfg.eval_median_last)
  results['timings'] = timings
  cluster.chief_only(strategy, write_json,
                     os.path.join(model_dir, 'results.json'), results)
  _print_results(results, models)
  if cluster.is_chief(strategy):
    try:
      drawn = curves.write_curves(model_dir, optim_cfg.num_steps)
    except (OSError, ValueError, tf.errors.OpError) as error:
      # The run itself is done and saved; a picture must not fail it.
      drawn = ''
      print(f'curves.png not drawn: {error}')
    if drawn:
      print(f'curves: {drawn}')
  return results


def phase_costs(config: Config) -> List[float]:
  """[main, finetune, supervised baseline]: each phase's whole work.

  In images through a forward and backward pass (the FLOP counts of
  benchmarks/step_benchmark.py), for the ETA over the remaining phases.
  """
  optim_cfg, run_cfg = config.optim, config.run
  batch, mu = optim_cfg.labeled_batch_size, optim_cfg.uda_ratio
  per_step = {'mpl': batch * (3 + 3 * mu), 'pseudo_labels': batch * (3 + 3 * mu),
              'uda': batch * (1 + 2 * mu)}.get(run_cfg.algorithm, batch)
  finetune = config.finetune.steps * (config.finetune.batch_size or batch)
  supervised = ((run_cfg.supervised_steps or optim_cfg.num_steps) * batch
                if run_cfg.supervised_baseline and
                run_cfg.algorithm != 'supervised' else 0)
  return [float(optim_cfg.num_steps * per_step), float(finetune),
          float(supervised)]


def _finetune(config: Config, strategy, manifest, ema_student, build,
              stop: cluster.StopRequest, later_steps: float):
  """Trains a copy of the EMA student on the labeled images alone."""
  finetune = config.finetune
  batch_size = finetune.batch_size or config.optim.labeled_batch_size
  decay_config = dataclasses.replace(config.optim,
                                     weight_decay=finetune.weight_decay)
  with strategy.scope():
    finetuned = build('finetuned_student')
    finetuned.set_weights(ema_student.get_weights())
    schedule = optim.WarmupCosine(finetune.learning_rate, finetune.steps)
    phase = _supervised_phase(
        'finetune', config, strategy, manifest, finetuned,
        optim.make_optimizer(schedule, decay_config, 'finetune_optimizer',
                             finetuned),
        finetune.steps, batch_size, decay_config,
        os.path.join(config.run.model_dir, 'finetune'), stop,
        # The key export.py serves: the finetuned student replaces the EMA one.
        model_key='ema_student')
    phase.write_images = False
  start = time.time()
  phase.train(validation_curve(config, strategy, manifest, finetuned,
                               os.path.join(config.run.model_dir, 'finetune')),
              later_steps * finetune.steps)
  return finetuned, time.time() - start


# What each reported network is, after its results.json key's suffix.
_WHAT = {'ema_student_finetuned': 'student (EMA), after finetuning',
         'ema_student': 'student (EMA), before finetuning',
         'student': 'student, no EMA', 'teacher': 'teacher',
         'uda_ema': 'UDA model (EMA)', 'uda': 'UDA model, no EMA',
         'supervised': 'supervised, same labels'}


def _describe(name: str) -> str:
  for suffix, what in _WHAT.items():
    if name == suffix or name.endswith('_' + suffix):
      return what
  return ''


def _print_results(results, models) -> None:
  """The final table: every network on the same validation and test images."""
  test_count = results[next(iter(models))]['test'].get('count')
  print('\n{:<27}{:<34}{:>11}{:>11}'.format(
      'top-1 of', '', 'validation', 'test') + (f' ({test_count} images)'
                                            if test_count else ''))
  # The supervised baseline first: what the labels alone give.
  order = sorted(models, key=lambda name: name != 'supervised')
  for name in order:
    print('{:<27}{:<34}{:>11.4f}{:>11.4f}'.format(
        name, _describe(name), results[name]['validation']['top1'],
        results[name]['test']['top1']))
  history = results['selected_history']
  if history:
    best, median = history['best_on_validation'], history['median_last']
    print(f'{next(iter(models))}, best on validation (step {best["step"]}): '
          f'test top-1 {best["test"]["top1"]:.4f}; median of the last '
          f'{median["k"]} evaluations: test top-1 '
          f'{median["test"]["top1"]:.4f}')
