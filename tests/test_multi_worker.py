"""A real two-worker cluster on this machine: two `main.py` processes.

Each worker is its own process with one CPU device and a TF_CONFIG naming
both on 127.0.0.1, on ports picked free at run time; every run is bounded
in time and its processes are killed when it ends or times out. The tiny
smoke preset is trained four ways:

* two clusters, uninterrupted, side by side: one with
  input_sharding=global_batch, one with the default `files` sharding (each
  host reads its own share of the records: record ranges of the smoke set's
  one shard per split). Both finish; model_dir holds one set of
  checkpoints, summaries and JSON files, written by the chief, and no
  worker's temporary directory; every evaluation counts each image once;
* one process with a two-replica MirroredStrategy (this pytest process:
  conftest.py splits the CPU into two devices): the same weights as the
  global_batch cluster after two steps, to the tolerance test_distribute.py
  uses (which trains two steps), because both layouts train on the same
  global batches, draw the same pseudo labels by global row and the same
  dropout masks by replica id. Later steps are not compared: differences of
  float32 rounding grow step by step (on an AVX-512 machine, tests without
  oneDNN: 8.6e-7 after 2 steps, 5.5e-5 after 3, 2.5e-2 after 6; the pseudo
  labels of both layouts were identical at steps 1-4). conftest.py turns
  oneDNN off: with it, the two-replica reference on the split CPU computed
  the second step's early-layer gradients 1.7e-3 away from the cluster and
  from itself without oneDNN;
* the `files` cluster killed twice (kill -9 of the non-chief worker, then,
  after a restart, of the chief): each time the survivor ends by itself with
  one line naming the lost worker (status 3); started a third time, the run
  ends bitwise equal to the uninterrupted `files` run (every variable of
  the checkpoint: weights, optimizer slots, EMA, h's baseline, random
  states).

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
          f'--num_steps={_NUM_STEPS}',
          '--steps_per_loop=1', '--checkpoint_every=1', '--eval_every=0',
          f'--keep_checkpoints={_NUM_STEPS}', '--deterministic',
          '--finetune_steps=0', '--nosupervised_baseline',
          '--eval_batch_size=50')
_GLOBAL_BATCH = '--input_sharding=global_batch'
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
  `common` flags for both, `extra` flags and working directories (`cwds`)
  per worker.
  """

  def __init__(self, data_dir: str, model_dir: str, log_dir: str,
               attempt: str, started=(0, 1), extra=((), ()),
               cwds=(REPO, REPO), common=(_GLOBAL_BATCH,)):
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
           f'--model_dir={model_dir}', *common, *extra[index]],
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

  def _start(self, model_dir: str, attempt: str, **kwargs) -> Cluster:
    cluster = Cluster(kwargs.pop('data_dir', self.data_dir), model_dir,
                      self.log_dir, attempt, **kwargs)
    self.addCleanup(cluster.kill)
    self.chief_pids.append(cluster.processes[0].pid)
    return cluster

  def _finish(self, cluster: Cluster) -> None:
    codes = cluster.wait(_RUN_TIMEOUT_SECONDS)
    self.assertEqual(codes, [0, 0], _log_text(self.log_dir))

  def _kill_after(self, cluster: Cluster, model_dir: str, step: int,
                  victim: int) -> int:
    """kill -9 of worker `victim` once a checkpoint of `step` is written.

    The survivor must end by itself, naming the lost worker, within
    seconds (TensorFlow's heartbeat timeout). Returns the latest step.
    """
    survivor = 1 - victim
    deadline = time.time() + _RUN_TIMEOUT_SECONDS
    while _latest_step(model_dir) < step and time.time() < deadline:
      self.assertIsNone(cluster.processes[victim].poll(),
                        _log_text(self.log_dir))
      time.sleep(0.05)
    cluster.processes[victim].send_signal(signal.SIGKILL)
    killed_at = _latest_step(model_dir)
    self.assertEqual(cluster.processes[survivor].wait(120), 3,
                     _log_text(self.log_dir))
    cluster.kill()
    line = cluster.last_lines()[survivor]
    self.assertStartsWith(line, f'error: worker {survivor} lost worker '
                          f'{victim} of its cluster mid-run (TensorFlow: ')
    self.assertEndsWith(line, 'Restart every worker with the same command: '
                        'they resume together from the last checkpoint.')
    return killed_at

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

  def test_cluster_trains_like_one_process_and_resumes_after_kills(self):
    started = time.time()
    # (a) A worker whose peer never starts, beside the uninterrupted runs.
    lone_dir = os.path.join(self.root, 'lone')
    lone = Cluster(self.data_dir, lone_dir, self.log_dir, 'lone',
                   started=(0,), extra=(['--cluster_start_timeout=5'], ()))
    self.addCleanup(lone.kill)
    # Two uninterrupted clusters side by side: global_batch (compared with
    # one process below) and the default `files` sharding, where each host
    # reads its own share of the records (data/input_shares.py: the smoke
    # set's one shard per split is cut into record ranges). Each prepares
    # its own data_dir (the chiefs would otherwise prepare one together).
    cluster_dir = os.path.join(self.root, 'cluster')
    files_dir = os.path.join(self.root, 'files')
    files_data = os.path.join(self.root, 'files_data')
    straight = self._start(cluster_dir, 'straight')
    files = self._start(files_dir, 'files', common=(), data_dir=files_data)
    self._finish(straight)
    self._finish(files)
    for model_dir in (cluster_dir, files_dir):
      self._assert_written_once_by_the_chief(model_dir)
      # Evaluation on the cluster: each worker read only its share of a
      # split's records (data/eval_stream.py), and the counts, summed
      # across the workers once per evaluation, are exact.
      with open(os.path.join(model_dir, 'results.json')) as f:
        results = json.load(f)
      for name in ('mpl_ema_student', 'mpl_student', 'mpl_teacher'):
        for split in ('validation', 'test'):
          self.assertEqual(results[name][split]['count'], 100,
                           (model_dir, name, split))
    with open(files.log_paths[0]) as f:   # the chief says which scheme
      self.assertRegex(f.read(), r"input: split 'unlabeled', 1,577 records "
                       r'in 1 shard\(s\), over 2 input pipelines: record '
                       r'ranges, 788 to 789 records per pipeline')
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
    config = train_config(self.data_dir, mirrored_dir, '--strategy=mirrored',
                          _GLOBAL_BATCH)
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

    # (d) The `files` cluster killed twice: kill -9 of the non-chief worker
    # after step 2, both started again, kill -9 of the chief two steps
    # later, both started again. The resumed run ends with the weights,
    # optimizer slots and random states of the uninterrupted one, bitwise:
    # each host resumed its own share of the records at its position.
    killed_dir = os.path.join(self.root, 'killed')
    kills = []
    for attempt, victim in (('killed', 1), ('chief-killed', 0)):
      cluster = self._start(killed_dir, attempt, common=(),
                            data_dir=files_data)
      step = kills[-1] + 2 if kills else 2
      kills.append(self._kill_after(cluster, killed_dir, step, victim))
    self.assertBetween(kills[0], 2, kills[1] - 1)
    self.assertLess(kills[1], _NUM_STEPS)
    self._finish(self._start(killed_dir, 'resumed', common=(),
                             data_dir=files_data))
    self._assert_written_once_by_the_chief(killed_dir)
    for attempt in ('chief-killed', 'resumed'):
      with open(os.path.join(self.log_dir, f'{attempt}-worker0.log')) as f:
        self.assertRegex(f.read(), r'resumed from .*ckpt-\d+ at step \d+')
    expected, resumed = _weights(files_dir), _weights(killed_dir)
    self.assertEqual(set(expected), set(resumed))
    for name, value in expected.items():
      self.assertAllEqual(resumed[name], value, msg=name)
    print(f'\ntwo-worker cluster: uninterrupted runs {straight_seconds:.0f} s; '
          f'vs MirroredStrategy after 2 steps {worst} (after {_NUM_STEPS}: '
          f'{final_difference:.1e}, not asserted); refusals waited for '
          f'after the one-process run: {refused_seconds:.0f} s; killed at '
          f'steps {kills}, resumed bitwise equal after {_NUM_STEPS} steps; '
          f'whole test {time.time() - started:.0f} s')


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
