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
  local temporary directory (tempfile), deleted right after, as TF's
  multi-worker checkpointing contract allows: no copies in the bucket. Every worker restores from the
  chief's directory, whose `checkpoint` state file, written after a
  checkpoint is complete, is the only list of complete checkpoints.
* `agree`: a vote before the run writes anything, so that a worker whose
  pre-flight check failed stops every worker with its message instead of
  leaving them blocked in their first collective.
* `check_same_config`, `check_same_steps`: before anything is written, the
  workers compare their whole configuration (one all-reduce) and the
  checkpoints they see; after every restore, the steps they restored. A
  difference stops every worker with one message naming it.
* `lost_peer`: a worker that dies mid-run (kill -9, a crashed host) makes
  TensorFlow abort the others' collectives within seconds; this turns that
  error into one line naming the lost worker and what to do.
* `StopRequest`: SIGTERM (a preemption, `kill`, the TPU VM's maintenance)
  asks the loop to save a checkpoint at the next device-loop boundary and
  end; with several workers the request is all-reduced, so a signal to any
  one of them stops all of them after the same step.
"""

import hashlib
import json
import re
import signal
import tempfile
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from mpl_tf.config import ConfigError

_SUM = tf.distribute.ReduceOp.SUM
# The exit status of main.py for a ClusterError (ConfigError's is 2).
CLUSTER_FAILURE_STATUS = 3


class ClusterError(RuntimeError):
  """The cluster failed to start or lost a worker; the message says what to do."""


class StartInterrupted(RuntimeError):
  """SIGTERM or Ctrl-C while a worker waited for its peers to start."""

  def __init__(self, signum: int):
    self.signum = int(signum)
    super().__init__(f'{signal.Signals(signum).name} while waiting for the '
                     f'other workers to start; nothing was written.')


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes to shared storage (model_dir, exports)."""
  return bool(getattr(strategy.extended, 'should_checkpoint', True))


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
  """Whether other processes take part in this strategy's collectives."""
  in_multi_worker = getattr(strategy.extended, '_in_multi_worker_mode', None)
  return bool(in_multi_worker and in_multi_worker())


def is_multi_host(strategy: tf.distribute.Strategy) -> bool:
  """Whether the input is split between hosts (multi-worker, TPU pods)."""
  return (is_multi_worker(strategy) or
          isinstance(strategy, tf.distribute.TPUStrategy))


def worker_id(strategy: tf.distribute.Strategy) -> int:
  resolver = getattr(strategy, 'cluster_resolver', None)
  return int(getattr(resolver, 'task_id', 0) or 0)


def _local_replicas(strategy: tf.distribute.Strategy) -> int:
  return len(strategy.extended.worker_devices)


def _sum_over_replicas(strategy: tf.distribute.Strategy,
                       values: np.ndarray) -> np.ndarray:
  """`values` summed over every replica of every worker (one all-reduce).

  Each worker's replicas hold that worker's values; with one worker no
  collective is needed.
  """
  if not is_multi_worker(strategy):
    return values * strategy.num_replicas_in_sync
  local = tf.constant(values)
  per_replica = strategy.run(lambda: tf.identity(local))
  return strategy.reduce(_SUM, per_replica, axis=None).numpy()


def _gather_workers(strategy: tf.distribute.Strategy,
                    values: Sequence[int]) -> np.ndarray:
  """[workers, len(values)]: every worker's `values` (one all-gather).

  Replicas are numbered worker by worker, so each worker's values come
  once per local replica; one row of each is kept.
  """
  row = np.asarray(values, np.int64)[np.newaxis]
  if not is_multi_worker(strategy):
    return row
  local = tf.constant(row)
  per_replica = strategy.run(lambda: tf.identity(local))
  gathered = strategy.gather(per_replica, axis=0).numpy()
  return gathered[::_local_replicas(strategy)]


def _count_true(strategy: tf.distribute.Strategy, value: bool) -> int:
  """How many replicas, over every worker, hold a true `value`."""
  total = _sum_over_replicas(strategy, np.array(1.0 if value else 0.0))
  return int(round(float(total)))


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


def config_fields(config_dict: Dict[str, Any]) -> Dict[str, Any]:
  """{'group.field': value} of a Config's dict, every field once."""
  return {f'{group}.{name}': value
          for group, fields in sorted(config_dict.items())
          for name, value in sorted(fields.items())}


def field_pieces(fields: Dict[str, Any]) -> np.ndarray:
  """[fields, 2]: a 32-bit hash of each field's value, as two 16-bit pieces.

  16-bit pieces and their squares, summed over up to 2**21 replicas, stay
  exact in float64, which makes the comparison in `differing_fields` exact.
  """
  pieces = []
  for value in fields.values():
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode())
    word = int.from_bytes(digest.digest()[:4], 'big')
    pieces.append((word & 0xFFFF, word >> 16))
  return np.array(pieces, np.float64).reshape(-1, 2)


def reduction_rows(pieces: np.ndarray) -> np.ndarray:
  """What each replica contributes to the sum: the pieces and their squares."""
  return np.concatenate([pieces, pieces ** 2], axis=1)


def differing_fields(names: Sequence[str], pieces: np.ndarray,
                     sums: np.ndarray, replicas: int) -> List[str]:
  """The fields whose value is not the same on every replica.

  `sums` is `reduction_rows` summed over `replicas` replicas. A field is
  the same everywhere iff the sums of its pieces and of their squares are
  `replicas` times this worker's: sum((p_i - p)^2) = sum(p_i^2) -
  2 p sum(p_i) + n p^2 is then 0. Every worker finds the same fields.
  """
  expected = reduction_rows(pieces) * replicas
  return [name for name, row, total in zip(names, expected, sums)
          if not np.array_equal(row, total)]


def check_same_config(strategy: tf.distribute.Strategy,
                      config_dict: Dict[str, Any]) -> None:
  """ConfigError on every worker unless all were given the same config.

  One all-reduce of per-field hash pieces (`differing_fields`): every
  worker names the fields that differ somewhere and its own values of
  them; each worker's log shows its side.
  """
  if not is_multi_worker(strategy):
    return
  fields = config_fields(config_dict)
  pieces = field_pieces(fields)
  sums = _sum_over_replicas(strategy, reduction_rows(pieces))
  names = differing_fields(list(fields), pieces, sums,
                           strategy.num_replicas_in_sync)
  if names:
    shown = ', '.join(f'{name}={fields[name]!r}' for name in names[:8])
    raise ConfigError(
        f'The workers were started with different settings of '
        f'{", ".join(names)} (here, on worker {worker_id(strategy)}: {shown}'
        f'{", ..." if len(names) > 8 else ""}). Start every worker with the '
        f'same command and flags (only TF_CONFIG\'s "task" differs); nothing '
        f'was written.')


def describe_values(values: Sequence[int], unit: str = 'step') -> str:
  """'step 6 on workers 0, 2; step 3 on worker 1': one value per worker."""
  workers: Dict[int, List[int]] = {}
  for worker, value in enumerate(values):
    workers.setdefault(int(value), []).append(worker)
  return '; '.join(
      f'{unit} {value} on worker{"s" if len(ids) > 1 else ""} '
      f'{", ".join(map(str, ids[:16]))}{", ..." if len(ids) > 16 else ""}'
      for value, ids in sorted(workers.items(), reverse=True))


def different_steps(steps: Dict[str, Sequence[int]]) -> List[str]:
  """'name: step 6 on worker 0; step 3 on worker 1' for each disagreement."""
  return [f'{name}: {describe_values(values)}'
          for name, values in steps.items() if len(set(values)) > 1]


def check_same_steps(strategy: tf.distribute.Strategy, what: str,
                     steps: Dict[str, int]) -> None:
  """ConfigError on every worker unless each of `steps` is the same on all.

  One all-gather of the steps (so that the message can name each worker's):
  a model_dir that is not one shared directory, or a stale copy of it,
  would leave the workers at different steps, which either hangs them or
  trains with weights out of sync.
  """
  if not is_multi_worker(strategy):
    return
  gathered = _gather_workers(strategy, list(steps.values()))
  found = different_steps({name: gathered[:, column] for column, name
                           in enumerate(steps)})
  if found:
    raise ConfigError(
        f'The workers {what} different steps ({"; ".join(found)}): their '
        f'model_dir is not one directory that every worker sees (a bucket, '
        f'NFS), or a worker holds a stale copy of it. Give every worker the '
        f'same shared --model_dir and start them all again with the same '
        f'command.')


# A task named in TensorFlow's error, e.g. /job:worker/replica:0/task:1.
_TASK = re.compile(r'/job:(\w+)(?:/replica:\d+)?/task:(\d+)')
_LOST_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError,
                     tf.errors.CancelledError, tf.errors.DeadlineExceededError,
                     tf.errors.InternalError)


def lost_peer(strategy: Optional[tf.distribute.Strategy],
              error: Exception) -> Optional[ClusterError]:
  """The one-line error for a collective that failed because a peer died.

  When a worker dies, TensorFlow's coordination service stops hearing its
  heartbeats (about 10 s) and aborts every collective of the others, or
  their next receive from it fails at once; the error names the lost task
  among others (this worker's own device).
  """
  if (strategy is None or not is_multi_worker(strategy) or
      not isinstance(error, _LOST_PEER_ERRORS)):
    return None
  text = getattr(error, 'message', None) or str(error)
  me = (_task_type(strategy), worker_id(strategy))
  tasks = sorted({(job, int(index)) for job, index in _TASK.findall(text)
                  if (job, int(index)) != me})
  who = (', '.join(f'{job} {index}' for job, index in tasks) or
         'another worker')
  # TensorFlow's first line, without the op's name ({{function_node ...}}).
  first = re.sub(r'\{\{.*?\}\}\s*', '', text.strip()).split('\n')[0]
  return ClusterError(
      f'{me[0]} {me[1]} lost {who} of its cluster mid-run (TensorFlow: '
      f'{first[:160] or type(error).__name__}). Restart every worker with the '
      f'same command: they resume together from the last checkpoint.')


def _task_type(strategy: tf.distribute.Strategy) -> str:
  resolver = getattr(strategy, 'cluster_resolver', None)
  return str(getattr(resolver, 'task_type', None) or 'worker')


class Checkpoints:
  """A CheckpointManager that only the chief writes into `directory`.

  Other workers save the same checkpoint (saving reads the variables, which
  may take collectives that every worker must enter) into a local temporary
  directory that is deleted as soon as the save returns: the bucket holds
  one copy per save, not one per worker. They read the chief's checkpoints
  (`latest`), so a restarted cluster resumes everywhere from the same step.
  """

  def __init__(self, strategy: tf.distribute.Strategy,
               checkpoint: tf.train.Checkpoint, directory: str,
               max_to_keep: int, step_counter: Optional[tf.Variable] = None,
               checkpoint_name: str = 'ckpt'):
    self.directory = directory
    self.chief = is_chief(strategy)
    self._checkpoint = checkpoint
    self._name = checkpoint_name
    self._step_counter = step_counter
    self._manager = None
    if self.chief:
      self._manager = tf.train.CheckpointManager(
          checkpoint, directory, max_to_keep=max_to_keep,
          step_counter=step_counter, checkpoint_name=checkpoint_name)
    self._worker = worker_id(strategy)

  @property
  def latest(self) -> Optional[str]:
    """The chief's newest complete checkpoint (its state file names it)."""
    if self.chief:
      return self._manager.latest_checkpoint
    return tf.train.latest_checkpoint(self.directory)

  def save(self, step: int) -> None:
    if self.chief:
      self._manager.save(checkpoint_number=step)
      return
    with tempfile.TemporaryDirectory(
        prefix=f'mpl_tf_worker_{self._worker}_') as local:
      tf.train.CheckpointManager(
          self._checkpoint, local, max_to_keep=1,
          step_counter=self._step_counter,
          checkpoint_name=self._name).save(checkpoint_number=step)


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
