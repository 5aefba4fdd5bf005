"""Who writes, who waits, and how a stop is agreed, for one or many workers.

Under MultiWorkerMirroredStrategy every worker runs the same program, and
every collective (an all-reduce in a step, an evaluation's sum, reading a
variable to save it) must be entered by all of them, in the same order. So
the workers do the same things, but only the chief writes to shared storage:

* `is_chief`: the chief writes model_dir (config.json, JSON histories and
  results, summaries, checkpoints, exports). Single-process strategies have
  one worker, which is the chief.
* `Checkpoints`: a CheckpointManager for the chief; the other workers save
  too (saving reads the variables, which may take collectives) but into a
  temporary directory of their own, deleted right after, as TF's
  multi-worker checkpointing contract says. Every worker restores from the
  chief's directory, whose `checkpoint` state file, written after a
  checkpoint is complete, is the only list of complete checkpoints.
* `agree`: a vote before the run writes anything, so that a worker whose
  pre-flight check failed stops every worker with its message instead of
  leaving them blocked in their first collective.
* `StopRequest`: SIGTERM (a preemption, `kill`, the TPU VM's maintenance)
  asks the loop to save a checkpoint at the next device-loop boundary and
  end; with several workers the request is all-reduced, so a signal to any
  one of them stops all of them after the same step.
"""

import os
import signal
import threading
from typing import Callable, Optional

import tensorflow as tf

from mpl_tf.config import ConfigError

_SUM = tf.distribute.ReduceOp.SUM


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes to shared storage (model_dir, exports)."""
  return bool(getattr(strategy.extended, 'should_checkpoint', True))


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
  """Whether other processes take part in this strategy's collectives."""
  in_multi_worker = getattr(strategy.extended, '_in_multi_worker_mode', None)
  return bool(in_multi_worker and in_multi_worker())


def worker_id(strategy: tf.distribute.Strategy) -> int:
  resolver = getattr(strategy, 'cluster_resolver', None)
  return int(getattr(resolver, 'task_id', 0) or 0)


def _count_true(strategy: tf.distribute.Strategy, value: bool) -> int:
  """How many replicas, over every worker, hold a true `value` (an all-reduce).

  Each worker's replicas hold that worker's value; with one worker no
  collective is needed.
  """
  if not is_multi_worker(strategy):
    return strategy.num_replicas_in_sync if value else 0
  local = tf.constant(1.0 if value else 0.0)
  per_replica = strategy.run(lambda: tf.identity(local))
  return int(round(float(strategy.reduce(_SUM, per_replica, axis=None))))


def agree(strategy: tf.distribute.Strategy, error: Optional[Exception]):
  """Raises `error`, or a note that another worker failed, unless all passed.

  Every worker must call this at the same point; a worker that raised
  before it would leave the others waiting in the all-reduce.
  """
  everyone_ok = (_count_true(strategy, error is None) ==
                 strategy.num_replicas_in_sync)
  if error is not None:
    raise error
  if not everyone_ok:
    raise ConfigError(
        'Another worker of this cluster failed its checks before training '
        'started; its error message says why (nothing was written).')


class Checkpoints:
  """A CheckpointManager that only the chief writes into `directory`.

  Other workers write the same checkpoint into
  `<directory>/../.worker_<id>_tmp` and delete it at once; they read the
  chief's checkpoints (`latest`), so a restarted cluster resumes everywhere
  from the same step.
  """

  def __init__(self, strategy: tf.distribute.Strategy,
               checkpoint: tf.train.Checkpoint, directory: str,
               max_to_keep: int, step_counter: Optional[tf.Variable] = None,
               checkpoint_name: str = 'ckpt'):
    self.directory = directory
    self.chief = is_chief(strategy)
    self._checkpoint = checkpoint
    self._name = checkpoint_name
    if self.chief:
      write_dir, keep = directory, max_to_keep
    else:
      write_dir = _temporary_dir(directory, worker_id(strategy))
      keep = 1
      if tf.io.gfile.exists(write_dir):
        # Left by this worker's earlier life, killed during a save.
        tf.io.gfile.rmtree(write_dir)
    self.write_dir = write_dir
    self._manager = tf.train.CheckpointManager(
        checkpoint, write_dir, max_to_keep=keep, step_counter=step_counter,
        checkpoint_name=checkpoint_name)

  @property
  def latest(self) -> Optional[str]:
    """The chief's newest complete checkpoint (its state file names it)."""
    if self.chief:
      return self._manager.latest_checkpoint
    return tf.train.latest_checkpoint(self.directory)

  def save(self, step: int) -> None:
    self._manager.save(checkpoint_number=step)
    if not self.chief and tf.io.gfile.exists(self.write_dir):
      tf.io.gfile.rmtree(self.write_dir)


def _temporary_dir(directory: str, task_id: int) -> str:
  parent, name = os.path.split(directory.rstrip('/'))
  return os.path.join(parent, f'.{name}_worker_{task_id}_tmp')


class StopRequest:
  """Set by SIGTERM; `requested()` tells every worker at the same step.

  The handler only sets a flag: the loop acts on it between device loops,
  where a checkpoint can be saved, and ends the run. Installed only in the
  main thread (Python's rule for signal handlers); elsewhere it is inert.
  """

  def __init__(self, strategy: tf.distribute.Strategy,
               signals=(signal.SIGTERM,)):
    self._strategy = strategy
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for signum in signals:
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, unused_frame) -> None:
    del signum
    self._event.set()

  def requested(self) -> bool:
    """Whether any worker was asked to stop (a collective under multi-worker).

    Every worker must call this once per device loop.
    """
    return _count_true(self._strategy, self._event.is_set()) > 0

  def close(self) -> None:
    """Puts the previous signal handlers back."""
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def __enter__(self) -> 'StopRequest':
    return self

  def __exit__(self, *unused_exception) -> None:
    self.close()


class StopRequested(RuntimeError):
  """The run ended early on a stop request, after saving a checkpoint."""


def summary_writer(strategy: tf.distribute.Strategy,
                   directory: str) -> tf.summary.SummaryWriter:
  """A TensorBoard writer on the chief; a writer that writes nothing elsewhere."""
  if is_chief(strategy):
    return tf.summary.create_file_writer(directory)
  return tf.summary.create_noop_writer()


def chief_only(strategy: tf.distribute.Strategy, write: Callable, *args,
               **kwargs) -> None:
  """Calls `write(*args, **kwargs)` on the chief only."""
  if is_chief(strategy):
    write(*args, **kwargs)
