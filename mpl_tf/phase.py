"""A training phase: its device loop, checkpoints, summaries and health.

Every phase of a run (MPL, UDA or supervised training, finetuning, the
supervised baseline) is one `Phase`: a replica step run in device loops of
`steps_per_loop` steps, a tf.train.Checkpoint of its networks, optimizers,
counters and RNG states (restored once, so a resumed phase continues as if
it had never stopped), TensorBoard scalars after every loop, a checkpoint
every `checkpoint_every` steps that never holds a NaN or Inf, and the
non-finite policy (`run.nonfinite`) applied after every loop. The phase
knows nothing of the algorithm: the replica step and what it checkpoints
come from train.py.
"""

import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional

import keras
import tensorflow as tf

from mpl_tf import cluster
from mpl_tf import device_loop
from mpl_tf.config import Config
from mpl_tf.data import augment
from mpl_tf.data import pipeline
from mpl_tf.health import NonFiniteGuard
from mpl_tf.models import random_states
from mpl_tf.models import replica_distinct_randomness
from mpl_tf.progress import Progress

# Scalars shown on the progress line (TensorBoard gets all of them).
_SHOWN = ('teacher/supervised_loss', 'teacher/uda_loss',
          'teacher/uda_mask_rate', 'student/pseudo_label_loss',
          'student/labeled_loss_new', 'mpl/h', 'supervised/loss')
_IMAGES_SHOWN = 4


class NonFiniteError(RuntimeError):
  """A loss or gradient became NaN or Inf under run.nonfinite='stop'."""


def finite_check(variables: List[tf.Variable]) -> Callable[[], tf.Tensor]:
  """A tf.function: whether every float variable is finite (a scalar bool).

  Checked before every save. One traced function over all variables (one
  host call, one bool back) instead of a few eager ops per variable: the
  large networks have thousands of variables with their optimizer slots.
  """
  floats = [v for v in variables if tf.as_dtype(v.dtype).is_floating]

  @tf.function
  def check():
    if not floats:
      return tf.constant(True)
    return tf.reduce_all(tf.stack([
        tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v)))
        for v in floats]))

  return check


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


@dataclasses.dataclass(frozen=True)
class RunContext:
  """What every phase of one run shares: its configuration, where it runs,
  its data's manifest and the stop request (SIGTERM) it answers."""
  config: Config
  strategy: Any
  manifest: Dict[str, Any]
  stop: cluster.StopRequest


class Phase:
  """One training phase: its step, state, checkpoints and summaries."""

  def __init__(self, name: str, context: RunContext, *,
               replica_step: Callable, step_counter: tf.Variable,
               checkpoint_items: Dict[str, Any], dataset_fn: Callable,
               num_steps: int, splits, directory: str, models,
               guard: NonFiniteGuard):
    config, strategy = context.config, context.strategy
    self.name, self.config, self.strategy = name, config, strategy
    self.guard, self.stop = guard, context.stop
    self._all_finite = finite_check(
        _variables_of(checkpoint_items.values()))
    self.manifest, self.num_steps = context.manifest, num_steps
    self.splits = splits
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
    self._step_agreed = False
    # The first batch's views go to TensorBoard once per run, from the main
    # phase; finetuning and the baseline only repeat the labeled view.
    self.write_images = True

  def restore(self) -> int:
    """Restores the latest checkpoint (once), if any; returns the step.

    After the first restore every worker checks that all restored the same
    step (cluster.check_same_steps; every worker restores at the same
    points, so the all-gather meets).
    """
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
    step = read_step(self.step_counter)
    if not self._step_agreed:
      self._step_agreed = True
      cluster.check_same_steps(self.strategy, 'restored',
                               {self.name: step})
    return step

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
    if self.guard.policy == 'skip':
      self._check_skip_limit(step)
    if step == 0 and self.write_images:
      self._write_images()
    progress = Progress(self.name, self.num_steps, run.steps_per_loop,
                        start_step=step, later_steps=later_steps)
    iterator = iter(self.strategy.distribute_datasets_from_function(
        lambda context: self.dataset_fn(context, step)))
    metrics = {}
    while step < self.num_steps:
      count = min(run.steps_per_loop, self.num_steps - step)
      metrics, stopped_early = self._device_loop(iterator, count)
      step = read_step(self.step_counter)
      skipped = read_step(self.guard.skipped_steps)
      with self.writer.as_default():
        for name, value in metrics.items():
          tf.summary.scalar(name, value, step=step)
        tf.summary.scalar('health/skipped_steps', skipped, step=step)
      progress.update(step, {k: v for k, v in metrics.items() if k in _SHOWN})
      self._check_finite(step, skipped, metrics)
      # (Every worker has the same stopped_early: it came from a vote.)
      stopping = stopped_early or self.stop.requested()
      saved = (stopping or step % run.checkpoint_every == 0 or
               step == self.num_steps)
      if saved:
        self._save(step)
      if stopping:
        self._stop(step)
      if on_eval and run.eval_every and step % run.eval_every == 0:
        on_eval(step)
        # A stop asked for during the evaluation ends the run now, not a
        # device loop later (the evaluation itself runs to its end).
        if self.stop.requested():
          if not saved:
            self._save(step)
          self._stop(step)
    progress.close()
    self.writer.flush()
    return metrics

  def _device_loop(self, iterator, count: int):
    """Runs `count` steps; returns (their mean metrics, stopped early).

    The steps run as calls of the loop of at most run.stop_check_steps
    steps each, with a vote on a stop request between two calls, so a
    SIGTERM (a preemption, stop.sh) is honoured within that many steps
    however long the device loop is. Every worker runs the same calls and
    votes at the same points (the vote is a collective). Each call costs one
    host round trip; the metrics are the step-weighted mean of the calls'.
    """
    chunk = self.config.run.stop_check_steps or count
    done, sums = 0, {}
    while done < count:
      steps = min(chunk, count - done)
      try:
        means = self.loop(iterator, tf.constant(steps))
      except tf.errors.OpError as error:
        problem = pipeline.find_input_problem(self.config, self.manifest,
                                              self.splits, error)
        if problem is None:
          raise
        raise problem from error
      for name, value in means.items():
        sums[name] = sums.get(name, 0.0) + float(value) * steps
      done += steps
      if done < count and self.stop.requested():
        break
    return {name: total / done for name, total in sums.items()}, done < count

  def _stop(self, step: int) -> None:
    """Ends the run on a stop request, after the checkpoint of `step`."""
    self.writer.flush()
    raise cluster.StopRequested(
        f'{self.name}: stopped by a stop request (SIGTERM) at step '
        f'{step} of {self.num_steps}, after saving {self._last_checkpoint()}'
        f'. Run the same command again to resume from there.')

  def _save(self, step: int) -> None:
    """A checkpoint of the state at `step`, never one holding NaN or Inf."""
    if not bool(self._all_finite()):
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
    self._check_skip_limit(step)
    print(f'{self.name}: {skipped} non-finite step(s) skipped so far '
          f'(the first at {self.guard.describe()}).')

  def _check_skip_limit(self, step: int) -> None:
    """Stops when the last nonfinite_skip_limit steps were all skipped.

    Also called right after a restore: the count is checkpointed, so a run
    started again after this stop (or with a lower limit) stops before it
    trains, instead of skipping on from a broken state.
    """
    in_a_row = read_step(self.guard.consecutive_skipped)
    if in_a_row and in_a_row >= self.config.run.nonfinite_skip_limit:
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
