"""A real two-worker cluster on this machine: two `main.py` processes.

Each worker is its own process with one CPU device and a TF_CONFIG naming
both on 127.0.0.1, on ports picked free at run time; every run is bounded
in time and its processes are killed when it ends or times out. The tiny
smoke preset is trained three ways:

* the cluster, uninterrupted: both workers finish; model_dir holds one set
  of checkpoints, summaries and JSON files, written by the chief, and no
  worker's temporary directory;
* one process with a two-replica MirroredStrategy (this pytest process:
  conftest.py splits the CPU into two devices): the same weights after two
  steps, to the tolerance test_distribute.py uses (which trains two steps),
  because both layouts train on the same global batches
  (input_sharding=global_batch), draw the same pseudo labels by global row
  and the same dropout masks by replica id. Later steps are not compared:
  differences of float32 rounding grow step by step (on an AVX-512 machine,
  tests without oneDNN: 8.6e-7 after 2 steps, 5.5e-5 after 3, 2.5e-2 after
  6; the pseudo labels of both layouts were identical at steps 1-4).
  conftest.py turns oneDNN off: with it, the two-replica reference on the
  split CPU computed the second step's early-layer gradients 1.7e-3 away
  from the cluster and from itself without oneDNN;
* the cluster killed (kill -9 of the non-chief worker mid-run): the chief
  ends by itself with one line naming the lost worker (status 3); then both
  workers started again: the resumed run ends with the weights of the
  uninterrupted one.

Misconfigured clusters, each refused before anything is written, run
beside the runs above (they take seconds and mostly wait): a worker whose
peer never starts (the deadline names it); two workers given different
flags (both name the fields); two workers whose model_dirs are not one
shared directory (a relative --model_dir in two working directories, one
holding a stale checkpoint state: both name each worker's step, and both
directories are left as they were).
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import tensorflow as tf

from mpl_tf import train
from tests.test_train import _variables
from tests.testing import file_hashes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NUM_STEPS = 6
_RUN_TIMEOUT_SECONDS = 300
_FLAGS = ('--flagfile=' + os.path.join(REPO, 'flags', 'smoke.cfg'),
          '--input_sharding=global_batch', f'--num_steps={_NUM_STEPS}',
          '--steps_per_loop=1', '--checkpoint_every=1', '--eval_every=0',
          f'--keep_checkpoints={_NUM_STEPS}', '--deterministic',
          '--finetune_steps=0', '--nosupervised_baseline',
          '--eval_batch_size=50')
_PREFIXES = ('teacher/', 'student/', 'ema_student/', 'teacher_optimizer/',
             'student_optimizer/', 'step/', 'h_baseline/', 'random_states/')


def _free_ports(count: int):
  """Ports free on 127.0.0.1 now (bound to port 0, then released)."""
  with contextlib.ExitStack() as stack:
    sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
    for sock in sockets:
      sock.bind(('127.0.0.1', 0))
    return [sock.getsockname()[1] for sock in sockets]


class Cluster:
  """Worker processes of main.py; kill() ends whatever still runs.

  A cluster of two workers, both started unless `started` names fewer;
  `extra` flags and working directories (`cwds`) per worker.
  """

  def __init__(self, data_dir: str, model_dir: str, log_dir: str,
               attempt: str, started=(0, 1), extra=((), ()),
               cwds=(REPO, REPO)):
    ports = _free_ports(2)
    workers = [f'127.0.0.1:{port}' for port in ports]
    self.addresses = workers
    self.log_paths = [os.path.join(log_dir, f'{attempt}-worker{index}.log')
                      for index in started]
    self.logs, self.processes = [], []
    for index, path in zip(started, self.log_paths):
      tf_config = {'cluster': {'worker': workers},
                   'task': {'type': 'worker', 'index': index}}
      env = dict(os.environ, TF_CONFIG=json.dumps(tf_config),
                 CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='2')
      log = open(path, 'w')
      self.logs.append(log)
      self.processes.append(subprocess.Popen(
          [sys.executable, os.path.join(REPO, 'main.py'), *_FLAGS,
           '--strategy=multi_worker', f'--data_dir={data_dir}',
           f'--model_dir={model_dir}', *extra[index]],
          cwd=cwds[index], env=env, stdout=log, stderr=subprocess.STDOUT))

  def last_lines(self):
    """The last line of each worker's output (its error, if it failed)."""
    lines = []
    for path in self.log_paths:
      with open(path) as f:
        lines.append(([''] + f.read().strip().splitlines())[-1])
    return lines

  def wait(self, timeout: float):
    """Exit codes of both workers; kills both on timeout."""
    deadline = time.time() + timeout
    try:
      return [process.wait(timeout=max(1.0, deadline - time.time()))
              for process in self.processes]
    finally:
      self.kill()

  def kill(self) -> None:
    for process in self.processes:
      if process.poll() is None:
        process.kill()
        process.wait()
    for log in self.logs:
      log.close()


def _log_text(log_dir: str) -> str:
  texts = []
  for name in sorted(os.listdir(log_dir)):
    with open(os.path.join(log_dir, name)) as f:
      texts.append(f'--- {name}\n' + f.read()[-3000:])
  return '\n'.join(texts)


def _weights(model_dir: str, step: int = _NUM_STEPS):
  prefix_path = os.path.join(model_dir, 'checkpoints', f'ckpt-{step}')
  values = {}
  for prefix in _PREFIXES:
    found = _variables(prefix_path, prefix)
    assert found, prefix
    values.update(found)
  return values


def _latest_step(model_dir: str) -> int:
  latest = tf.train.latest_checkpoint(os.path.join(model_dir, 'checkpoints'))
  return int(latest.rsplit('-', 1)[1]) if latest else 0


class TwoWorkerClusterTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
    self.data_dir = os.path.join(self.root, 'data')
    self.log_dir = os.path.join(self.root, 'logs')
    os.makedirs(self.log_dir)
    self.chief_pids = []

  def _run_cluster(self, model_dir: str, attempt: str):
    cluster = Cluster(self.data_dir, model_dir, self.log_dir, attempt)
    self.chief_pids.append(cluster.processes[0].pid)
    codes = cluster.wait(_RUN_TIMEOUT_SECONDS)
    self.assertEqual(codes, [0, 0], _log_text(self.log_dir))

  def _assert_written_once_by_the_chief(self, model_dir: str):
    everything = sorted(
        os.path.relpath(os.path.join(directory, name), model_dir)
        for directory, _, files in os.walk(model_dir) for name in files)
    # Workers' temporary checkpoint directories (cluster.Checkpoints) are
    # hidden; TF's own interrupted writes end in _temp.
    left = [path for path in everything if any(
        part.startswith('.') or part.endswith(('_temp', '_tmp'))
        for part in path.split(os.sep))]
    self.assertEqual(left, [], 'a temporary file or directory is left')
    checkpoints = os.path.join(model_dir, 'checkpoints')
    self.assertEqual(_latest_step(model_dir), _NUM_STEPS)
    self.assertEqual(sorted(os.listdir(checkpoints)), sorted(
        ['best', 'checkpoint'] + [
            f'ckpt-{step}{suffix}' for step in range(1, _NUM_STEPS + 1)
            for suffix in ('.index', '.data-00000-of-00001')]))
    # Summaries: events files carry the writer's process id, and only the
    # chief's processes (one per start of the cluster) wrote any.
    for logs in ('train', 'eval'):
      events = os.listdir(os.path.join(model_dir, 'logs', logs))
      writers = {int(name.split('.')[-3]) for name in events}
      self.assertNotEmpty(writers)
      self.assertContainsSubset(writers, self.chief_pids)
    for name in ('config.json', 'eval_history.json', 'results.json'):
      self.assertIn(name, everything)

  def _stale_copies(self):
    """Two working directories whose run/ differ in their latest checkpoint.

    Copies of the uninterrupted run: worker 1's state file names ckpt-3, as
    a stale local copy of a model_dir would. Returns the working
    directories and the hashes of every file under each run/.
    """
    cwds = []
    for name, step in (('host0', _NUM_STEPS), ('host1', 3)):
      run_dir = os.path.join(self.root, name, 'run')
      shutil.copytree(os.path.join(self.root, 'cluster'), run_dir)
      with open(os.path.join(run_dir, 'checkpoints', 'checkpoint'), 'w') as f:
        f.write(f'model_checkpoint_path: "ckpt-{step}"\n')
      cwds.append(os.path.dirname(run_dir))
    return cwds, [file_hashes(os.path.join(cwd, 'run')) for cwd in cwds]

  def test_cluster_trains_like_one_process_and_resumes_after_kill(self):
    started = time.time()
    # (a) A worker whose peer never starts, beside the uninterrupted run.
    lone_dir = os.path.join(self.root, 'lone')
    lone = Cluster(self.data_dir, lone_dir, self.log_dir, 'lone',
                   started=(0,), extra=(['--cluster_start_timeout=5'], ()))
    self.addCleanup(lone.kill)
    cluster_dir = os.path.join(self.root, 'cluster')
    self._run_cluster(cluster_dir, 'straight')
    self._assert_written_once_by_the_chief(cluster_dir)
    straight_seconds = time.time() - started
    self.assertEqual(lone.wait(60), [3])
    self.assertEqual(lone.last_lines(), [
        f'error: worker 0: worker 1 ({lone.addresses[1]}) did not start '
        f'within --cluster_start_timeout=5 seconds (nothing answered at that '
        f'address). Start every worker of TF_CONFIG with the same command, '
        f'or check the addresses and the network between the hosts; nothing '
        f'was written.'])
    self.assertFalse(os.path.exists(lone_dir))

    # (b) Different flags; (e) model_dirs that are not one shared
    # directory: both refused, beside the one-process run below.
    different_dir = os.path.join(self.root, 'different')
    different = Cluster(self.data_dir, different_dir, self.log_dir,
                        'different', extra=((), ['--teacher_lr=0.1']))
    cwds, hashes = self._stale_copies()
    stale = Cluster(self.data_dir, 'run', self.log_dir, 'stale', cwds=cwds)
    self.addCleanup(different.kill)
    self.addCleanup(stale.kill)

    # (c) The same config in one process on a two-replica MirroredStrategy.
    mirrored_dir = os.path.join(self.root, 'mirrored')
    config = train_config(self.data_dir, mirrored_dir, '--strategy=mirrored')
    train.run(config)
    refused_seconds = time.time()
    self.assertEqual(different.wait(_RUN_TIMEOUT_SECONDS), [2, 2],
                     _log_text(self.log_dir))
    for worker, (line, value) in enumerate(zip(different.last_lines(),
                                               ('0.05', '0.1'))):
      self.assertEqual(
          line, f'error: The workers were started with different settings of '
          f'optim.teacher_lr (here, on worker {worker}: optim.teacher_lr='
          f'{value}). Start every worker with the same command and flags '
          f'(only TF_CONFIG\'s "task" differs); nothing was written.')
    self.assertFalse(os.path.exists(different_dir))
    self.assertEqual(stale.wait(_RUN_TIMEOUT_SECONDS), [2, 2],
                     _log_text(self.log_dir))
    for line in stale.last_lines():
      self.assertStartsWith(
          line, f'error: The workers see checkpoints of different steps '
          f'(run/checkpoints: step {_NUM_STEPS} on worker 0; step 3 on '
          f'worker 1): their model_dir is not one directory that every worker '
          f'sees')
    self.assertEqual([file_hashes(os.path.join(cwd, 'run')) for cwd in cwds],
                     hashes)
    refused_seconds = time.time() - refused_seconds
    cluster_weights = _weights(cluster_dir, 2)
    mirrored_weights = _weights(mirrored_dir, 2)
    self.assertEqual(set(cluster_weights), set(mirrored_weights))
    worst = _assert_close(self, mirrored_weights, cluster_weights)
    final_difference = _largest_difference(_weights(mirrored_dir),
                                           _weights(cluster_dir))

    # (d) kill -9 the non-chief worker mid-run; start both again.
    killed_dir = os.path.join(self.root, 'killed')
    cluster = Cluster(self.data_dir, killed_dir, self.log_dir, 'killed')
    self.chief_pids.append(cluster.processes[0].pid)
    try:
      deadline = time.time() + _RUN_TIMEOUT_SECONDS
      while _latest_step(killed_dir) < 3 and time.time() < deadline:
        self.assertIsNone(cluster.processes[1].poll(),
                          _log_text(self.log_dir))
        time.sleep(0.05)
      cluster.processes[1].send_signal(signal.SIGKILL)
      killed_at = _latest_step(killed_dir)
      lost_seconds = time.time()
      # The chief ends by itself, naming the lost worker, within seconds
      # (TensorFlow's heartbeat timeout).
      self.assertEqual(cluster.processes[0].wait(120), 3,
                       _log_text(self.log_dir))
      lost_seconds = time.time() - lost_seconds
    finally:
      cluster.kill()
    self.assertBetween(killed_at, 3, _NUM_STEPS - 1)
    self.assertStartsWith(cluster.last_lines()[0],
                          'error: worker 0 lost worker 1 of its cluster '
                          'mid-run (TensorFlow: ')
    self.assertEndsWith(cluster.last_lines()[0],
                        'Restart every worker with the same command: they '
                        'resume together from the last checkpoint.')
    self._run_cluster(killed_dir, 'resumed')
    self._assert_written_once_by_the_chief(killed_dir)
    with open(os.path.join(self.log_dir, 'resumed-worker0.log')) as f:
      self.assertRegex(f.read(), r'resumed from .*ckpt-\d+ at step \d+')
    resumed_worst = _assert_close(self, _weights(cluster_dir),
                                  _weights(killed_dir))
    print(f'\ntwo-worker cluster: uninterrupted run {straight_seconds:.0f} s; '
          f'vs MirroredStrategy after 2 steps {worst} (after {_NUM_STEPS}: '
          f'{final_difference:.1e}, not asserted); refusals waited for '
          f'after the one-process run: {refused_seconds:.0f} s; killed at '
          f'step {killed_at}, the chief ended {lost_seconds:.0f} s later; '
          f'resumed vs uninterrupted after {_NUM_STEPS} steps '
          f'{resumed_worst}; whole test {time.time() - started:.0f} s')


def train_config(data_dir: str, model_dir: str, *extra):
  """The cluster's flags as a Config, for a run in this process."""
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from flags import definitions  # pylint: disable=g-import-not-at-top
  flag_values = absl_flags.FlagValues()
  definitions.define(flag_values)
  flag_values(['test', *_FLAGS, f'--data_dir={data_dir}',
               f'--model_dir={model_dir}', *extra])
  return definitions.to_config(flag_values)


def _largest_difference(expected, actual) -> float:
  return max(float(abs(actual[name] - value).max())
             for name, value in expected.items()
             if value.dtype.kind == 'f' and value.size)


def _assert_close(test_case, expected, actual):
  """test_distribute.py's tolerances; returns the largest differences."""
  worst = {'weights': 0.0, 'optimizer slots': 0.0}
  for name, value in expected.items():
    slots = 'optimizer' in name
    tolerance = (dict(rtol=1e-3, atol=5e-4) if slots else
                 dict(rtol=1e-5, atol=1e-6))
    test_case.assertAllClose(actual[name], value, msg=name, **tolerance)
    key = 'optimizer slots' if slots else 'weights'
    if value.dtype.kind == 'f' and value.size:
      worst[key] = max(worst[key], float(abs(actual[name] - value).max()))
  return {key: f'{value:.1e}' for key, value in worst.items()}


if __name__ == '__main__':
  tf.test.main()
