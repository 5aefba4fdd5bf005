"""The multi-worker checks, in this process: a simulated cluster of threads.

What the two-process test (tests/test_multi_worker.py) cannot afford to run
for every case: the configuration comparison and the naming of the fields
that differ, the step agreement after a restore, the start-up deadline on a
fake clock, the port, SIGTERM and Ctrl-C during the wait, the one line for a
lost worker, the non-chief's checkpoint copies, the finiteness check, and a
refusal of the input before anything is written.

`_FakeWorker` is a strategy as cluster.py sees it: each worker is a thread,
and its all-reduce and all-gather meet the other threads' at a barrier, so
every worker computes its verdict from the others' real contributions.
"""

import dataclasses
import os
import signal
import socket
import tempfile
import threading
import time
from types import SimpleNamespace
from unittest import mock

import numpy as np
import tensorflow as tf

from mpl_tf import cluster
from mpl_tf import phase as phase_lib
from mpl_tf import rendezvous
from mpl_tf import train
from mpl_tf.config import Config, ConfigError
from mpl_tf.data import pipeline
from tests.test_train import _config, _tempdir
from tests.testing import DataDirTestCase


class _Collective:
  """Where the threads of a simulated cluster exchange their values."""

  def __init__(self, workers: int):
    self.barrier = threading.Barrier(workers, timeout=30)
    self.values = [None] * workers

  def exchange(self, worker: int, value):
    self.values[worker] = value
    self.barrier.wait()
    values = list(self.values)
    self.barrier.wait()
    return values


class _FakeWorker:
  """A MultiWorkerMirroredStrategy as cluster.py sees it (one replica)."""

  def __init__(self, collective: _Collective, worker: int, workers: int):
    self._collective, self._worker = collective, worker
    self.extended = SimpleNamespace(
        _in_multi_worker_mode=lambda: True, worker_devices=('/cpu:0',),
        should_checkpoint=worker == 0)
    self.cluster_resolver = SimpleNamespace(task_type='worker',
                                            task_id=worker)
    self.num_replicas_in_sync = workers

  def run(self, fn):
    return fn()

  def reduce(self, unused_op, value, axis):
    del axis
    return tf.add_n(self._collective.exchange(self._worker, value))

  def gather(self, value, axis):
    return tf.concat(self._collective.exchange(self._worker, value), axis)


def _on_every_worker(function, workers: int):
  """function(strategy, worker) on `workers` threads; their results/errors."""
  collective = _Collective(workers)
  results = [None] * workers

  def call(worker):
    try:
      results[worker] = function(_FakeWorker(collective, worker, workers),
                                 worker)
    except Exception as error:  # pylint: disable=broad-except
      results[worker] = error

  threads = [threading.Thread(target=call, args=(i,)) for i in range(workers)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(60)
  return results


class ConfigAgreementTest(tf.test.TestCase):

  def test_fields_that_differ_are_named_on_every_worker(self):
    base = Config()
    configs = [base, dataclasses.replace(
        base, optim=dataclasses.replace(base.optim, teacher_lr=0.1)), base]
    configs[2] = dataclasses.replace(
        base, run=dataclasses.replace(base.run, seed=3))
    results = _on_every_worker(lambda strategy, i: cluster.check_same_config(
        strategy, configs[i].to_dict()), 3)
    for worker, error in enumerate(results):
      self.assertIsInstance(error, ConfigError, worker)
      self.assertRegex(
          str(error), r'^The workers were started with different settings '
          r'of optim.teacher_lr, run.seed \(here, on worker '
          f'{worker}: ')
    self.assertIn('optim.teacher_lr=0.1, run.seed=0', str(results[1]))
    self.assertIn('optim.teacher_lr=0.05, run.seed=3', str(results[2]))
    # The same config everywhere passes.
    self.assertEqual(_on_every_worker(
        lambda strategy, i: cluster.check_same_config(strategy,
                                                      base.to_dict()), 3),
                     [None] * 3)

  def test_the_comparison_is_exact_for_any_field_and_many_replicas(self):
    # differing_fields against an enumeration: for every field of the
    # config, a second worker that differs only there is found there and
    # nowhere else, with the sums of 2**20 replicas.
    fields = cluster.config_fields(Config().to_dict())
    names = list(fields)
    self.assertGreater(len(names), 80)
    own = cluster.field_pieces(fields)
    replicas = 2**20
    same = cluster.reduction_rows(own) * replicas
    self.assertEqual(cluster.differing_fields(names, own, same, replicas), [])
    # Differences that cancel in the sum (p - 5, p, p + 5) show in the
    # squares.
    pieces = np.array([[10.0, 20.0]])
    sums = (cluster.reduction_rows(pieces - [5, 0]) +
            cluster.reduction_rows(pieces) +
            cluster.reduction_rows(pieces + [5, 0]))
    self.assertEqual(cluster.differing_fields(['f'], pieces, sums, 3), ['f'])
    for index, name in enumerate(names):
      other = dict(fields)
      other[name] = [fields[name], 'changed']
      rows = cluster.reduction_rows(cluster.field_pieces(other))
      sums = cluster.reduction_rows(own) * (replicas - 1) + rows
      self.assertEqual(cluster.differing_fields(names, own, sums, replicas),
                       [name], index)


class StepAgreementTest(tf.test.TestCase):

  def test_describe_values_groups_workers_by_step(self):
    self.assertEqual(cluster.describe_values([6, 3, 6]),
                     'step 6 on workers 0, 2; step 3 on worker 1')
    self.assertEqual(cluster.different_steps({'a': [4, 4], 'b': [0, 2]}),
                     ['b: step 2 on worker 1; step 0 on worker 0'])

  def test_workers_that_restored_different_steps_all_stop(self):
    # Phase.restore itself, on two simulated workers whose model_dirs hold
    # different checkpoints (a model_dir that is not truly shared).
    root = _tempdir(self)
    selves = []
    for worker, step in enumerate((6, 3)):
      directory = os.path.join(root, f'worker{worker}', 'checkpoints')
      counter = tf.Variable(step, dtype=tf.int64)
      checkpoint = tf.train.Checkpoint(step=counter)
      tf.train.CheckpointManager(checkpoint, directory, 3).save(step)
      counter.assign(0)
      selves.append(SimpleNamespace(
          name='mpl', checkpoint=checkpoint, step_counter=counter,
          checkpoints=SimpleNamespace(
              directory=directory,
              latest=tf.train.latest_checkpoint(directory)),
          _restored=False, _step_agreed=False))

    def restore(strategy, worker):
      selves[worker].strategy = strategy
      return phase_lib.Phase.restore(selves[worker])

    results = _on_every_worker(restore, 2)
    for error in results:
      self.assertIsInstance(error, ConfigError)
      self.assertRegex(str(error), r'^The workers restored different steps '
                       r'\(mpl: step 6 on worker 0; step 3 on worker 1\): '
                       r'their model_dir is not one directory')
    # The same step everywhere: both go on.
    selves[1].checkpoints.latest = selves[0].checkpoints.latest
    for state in selves:
      state._restored = state._step_agreed = False
    self.assertEqual(_on_every_worker(restore, 2), [6, 6])


class _FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now

  def sleep(self, seconds):
    self.now += seconds


def _tf_config(index: int, workers: int = 3):
  return {'cluster': {'worker': [f'127.0.0.1:{2000 + i}'
                                 for i in range(workers)]},
          'task': {'type': 'worker', 'index': index}}


class StartDeadlineTest(tf.test.TestCase):

  def _wait(self, up, timeout=60.0, index=0, clock=None):
    clock = clock or _FakeClock()
    said, closed = [], []
    listener = SimpleNamespace(close=lambda: closed.append(True))
    left = rendezvous.wait_for_peers(
        _tf_config(index), timeout, clock=clock, sleep=clock.sleep,
        is_reachable=lambda address: up(address, clock.now),
        listen_on=lambda address: listener, say=said.append)
    return left, said, closed, clock

  def test_missing_peers_are_named_after_the_deadline(self):
    # Worker 1 answers; worker 2 never does.
    up = lambda address, now: address.endswith(':2001')
    clock = _FakeClock()
    with self.assertRaises(cluster.ClusterError) as raised:
      self._wait(up, clock=clock)
    self.assertEqual(clock.now, 160.0)   # started at 100, 60 s deadline
    self.assertEqual(
        str(raised.exception),
        'worker 0: worker 2 (127.0.0.1:2002) did not start within '
        '--cluster_start_timeout=60 seconds (nothing answered at that '
        'address). Start every worker of TF_CONFIG with the same command, '
        'or check the addresses and the network between the hosts; nothing '
        'was written.')

  def test_peers_that_come_late_are_waited_for_once_each(self):
    # Worker 1 answers only at t=+4 s (once seen is enough), worker 2 from
    # t=+10 s.
    up = lambda address, now: (address.endswith(':2001') and now == 104 or
                               address.endswith(':2002') and now >= 110)
    left, said, closed, clock = self._wait(up)
    self.assertEqual(clock.now, 110.0)
    self.assertEqual(left, 50.0)
    self.assertEqual(said, ['worker 0: waiting up to 60 s for worker 1 '
                            '(127.0.0.1:2001), worker 2 (127.0.0.1:2002) '
                            'to start'])
    self.assertEqual(closed, [True])
    # Everyone there at once: nothing said, the whole deadline left.
    left, said, _, _ = self._wait(lambda address, now: True)
    self.assertEqual((left, said), (60.0, []))

  def test_a_port_in_use_is_named_at_once(self):
    with socket.create_server(('127.0.0.1', 0)) as taken:
      port = taken.getsockname()[1]
      with self.assertRaisesRegex(
          cluster.ClusterError, f'^This worker cannot listen on port {port}, '
          f'its address 127.0.0.1:{port} in TF_CONFIG .*another program'):
        rendezvous.listen(f'127.0.0.1:{port}')

  def test_the_listener_takes_the_probes_of_a_large_slice(self):
    # 300 probes in a row at one worker: every one answered (the queue of
    # unaccepted connections is long enough), and the listener's thread
    # accepts them all, so the queue never stays full.
    listener = rendezvous.listen('127.0.0.1:0')
    port = listener._server.getsockname()[1]  # pylint: disable=protected-access
    try:
      for probe in range(300):
        self.assertTrue(rendezvous.reachable(f'127.0.0.1:{port}'), probe)
      deadline = time.monotonic() + 30
      while listener.accepted < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
      self.assertEqual(listener.accepted, 300)
    finally:
      listener.close()
    self.assertFalse(rendezvous.reachable(f'127.0.0.1:{port}'))

  def test_sigterm_and_ctrl_c_end_the_wait_at_once(self):
    # A real wait (real clock, a free port, a peer that never comes).
    handler_before = signal.getsignal(signal.SIGTERM)
    # Ctrl-C as a terminal delivers it: Python's KeyboardInterrupt. A test
    # process started in the background of a script inherits SIGINT
    # ignored (POSIX), and then no Ctrl-C reaches it, nor this one.
    self.addCleanup(signal.signal, signal.SIGINT,
                    signal.signal(signal.SIGINT, signal.default_int_handler))
    for signum in (signal.SIGTERM, signal.SIGINT):
      with self.subTest(signal=signum.name):
        with socket.create_server(('127.0.0.1', 0)) as probe:
          ports = [probe.getsockname()[1]]
        with socket.create_server(('127.0.0.1', 0)) as probe:
          ports.append(probe.getsockname()[1])
        tf_config = {'cluster': {'worker': [f'127.0.0.1:{p}' for p in ports]},
                     'task': {'type': 'worker', 'index': 0}}
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signum))
        started = time.monotonic()
        timer.start()
        with self.assertRaises(cluster.StartInterrupted) as raised:
          rendezvous.wait_for_peers(tf_config, 600, say=lambda line: None)
        self.assertLess(time.monotonic() - started, 3.0)
        self.assertEqual(raised.exception.signum, signum)
        self.assertStartsWith(str(raised.exception),
                              f'{signum.name} while waiting for the other')
        self.assertIs(signal.getsignal(signal.SIGTERM), handler_before)


class LostPeerTest(tf.test.TestCase):

  def test_a_lost_worker_is_named_with_what_to_do(self):
    # The errors of a two-worker cluster on this machine (TF 2.20) when
    # worker 1, then worker 0, was killed with -9 mid-run.
    heartbeat = (
        '{{function_node __wrapped__CollectiveReduceV2_Nordering_token_1_'
        'device_/job:worker/replica:0/task:0/device:CPU:0}} Collective ops '
        'is aborted by: Error reported from /job:worker/task:1: The following '
        'tasks are unhealthy (stopped sending heartbeats):\n/job:worker/'
        'replica:0/task:1\nThe tasks have crashed.')
    socket_closed = (
        '{{function_node __wrapped__CollectiveReduceV2_Nordering_token_1_'
        'device_/job:worker/replica:0/task:1/device:CPU:0}} Collective ops is '
        'aborted by: Socket closed\nAdditional GRPC error information from '
        'remote target /job:worker/replica:0/task:0 while calling '
        '/tensorflow.WorkerService/RecvBuf:')
    cases = [(0, heartbeat, 'worker 0 lost worker 1 of its cluster mid-run '
              '(TensorFlow: Collective ops is aborted by: Error reported from '
              '/job:worker/task:1: The following tasks are unhealthy (stopped '
              'sending heartbeats):). Restart every worker with the same '
              'command: they resume together from the last checkpoint.'),
             (1, socket_closed, 'worker 1 lost worker 0 of its cluster '
              'mid-run (TensorFlow: Collective ops is aborted by: Socket '
              'closed). Restart every worker')]
    for worker, text, expected in cases:
      strategy = _FakeWorker(_Collective(1), worker, 2)
      error = tf.errors.UnavailableError(None, None, text)
      self.assertStartsWith(str(cluster.lost_peer(strategy, error)), expected)
    # Not multi-worker, or not a collective's failure: left alone.
    single = SimpleNamespace(extended=SimpleNamespace())
    self.assertIsNone(cluster.lost_peer(single, error))
    self.assertIsNone(cluster.lost_peer(
        strategy, tf.errors.InvalidArgumentError(None, None, heartbeat)))


class NonChiefCheckpointTest(tf.test.TestCase):

  def test_non_chief_saves_into_a_local_temporary_directory(self):
    root = _tempdir(self)
    shared = os.path.join(root, 'bucket', 'checkpoints')
    local_root = os.path.join(root, 'local_tmp')
    os.makedirs(local_root)
    variable = tf.Variable([1.0, 2.0])
    checkpoint = tf.train.Checkpoint(v=variable)
    written = []
    real_save = tf.train.CheckpointManager.save

    def spy(manager, *args, **kwargs):
      path = real_save(manager, *args, **kwargs)
      written.append((path, sorted(os.listdir(manager.directory))))
      return path

    worker = _FakeWorker(_Collective(1), 1, 2)
    with mock.patch.object(tempfile, 'tempdir', local_root), \
        mock.patch.object(tf.train.CheckpointManager, 'save', spy):
      saver = cluster.Checkpoints(worker, checkpoint, shared, max_to_keep=3)
      saver.save(3)
      saver.save(4)
    self.assertLen(written, 2)
    for (path, files), step in zip(written, (3, 4)):
      self.assertStartsWith(path, os.path.join(local_root, 'mpl_tf_worker_1_'))
      self.assertEndsWith(path, f'ckpt-{step}')
      self.assertIn(f'ckpt-{step}.index', files)
    self.assertEqual(os.listdir(local_root), [])   # deleted after each save
    self.assertFalse(os.path.exists(os.path.join(root, 'bucket')))
    self.assertIsNone(saver.latest)


class FiniteCheckTest(tf.test.TestCase):

  def test_one_traced_function_over_every_float_variable(self):
    floats = [tf.Variable(np.ones([3, 2], np.float32)),
              tf.Variable(np.zeros([5], np.float64))]
    integer = tf.Variable([7], dtype=tf.int64)
    check = phase_lib.finite_check(floats + [integer])
    self.assertTrue(bool(check()))
    for variable, bad in ((floats[0], np.nan), (floats[1], -np.inf)):
      with self.subTest(bad=bad):
        before = variable.numpy()
        value = before.copy()
        value.flat[-1] = bad
        variable.assign(value)
        self.assertFalse(bool(check()))
        variable.assign(before)
        self.assertTrue(bool(check()))
    # Traced once: every later check is one call, not ops per variable.
    self.assertEqual(check.experimental_get_tracing_count(), 1)


class InputRefusalTest(DataDirTestCase):

  def test_an_input_the_cluster_cannot_shard_refuses_before_any_write(self):
    # What smoke.cfg on two workers did with one file per split: the
    # input pipeline refused after config.json was written, and that
    # config.json then refused the fix (--input_sharding=global_batch).
    model_dir = os.path.join(_tempdir(self), 'run')
    config = _config(model_dir, self.data_dir, '--nosupervised_baseline')
    refusal = ValueError("Split 'labeled' has 1 files for 2 input pipelines")
    # The input is built before the write where hosts share it; this
    # process's one device stands in for such a strategy.
    with mock.patch.object(pipeline, 'train_dataset', side_effect=refusal), \
        mock.patch.object(cluster, 'is_multi_host', return_value=True):
      with self.assertRaisesRegex(ValueError, '1 files for 2 input pipelines'):
        train.run(config)
    self.assertFalse(os.path.exists(model_dir))


if __name__ == '__main__':
  tf.test.main()
