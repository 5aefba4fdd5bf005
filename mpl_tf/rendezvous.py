"""Before MultiWorkerMirroredStrategy starts: every peer, within a deadline.

TensorFlow's own start of a cluster (the coordination service that
MultiWorkerMirroredStrategy starts) waits for every task of TF_CONFIG inside
one C++ call: silently, for an hour by default, deaf to Ctrl-C, and with
SIGTERM taken over by TensorFlow. A worker whose port another program holds
dies there after about 20 s with a traceback, while its peers wait on. So
each worker first meets its peers here, in Python:

* it listens on its own TF_CONFIG port (a plain socket; a thread accepts
  and closes every connection, so that the kernel's queue never fills with
  a large cluster's probes), so that its peers can see it; a port it cannot
  bind is one message naming the port, at once;
* it connects to every peer's port (up to 64 at a time: a host that is not
  up yet may take the whole connect timeout) until each has answered once,
  printing one line naming the missing ones while it waits; peers that do
  not answer within `--cluster_start_timeout` seconds are named in one
  message;
* SIGTERM and Ctrl-C end the wait at once (cluster.StartInterrupted).

The listening socket is closed before TensorFlow binds the same port; a
peer that tries it in between is refused and tries again. TensorFlow's own
start then runs under a watchdog (`deadline`) with the time left, so a peer
that vanished in between, or a port that another program answers on, ends
with a message too instead of an hour's wait.
"""

import concurrent.futures
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, List, NamedTuple

from mpl_tf.cluster import CLUSTER_FAILURE_STATUS, ClusterError, StartInterrupted

# The jobs whose tasks take part in MultiWorkerMirroredStrategy's
# collectives (an 'evaluator' does not), in TensorFlow's order.
_COLLECTIVE_JOBS = ('chief', 'worker')
_POLL_SECONDS = 0.5
_BACKLOG = 1024
_CONNECT_SECONDS = 1.0
_PARALLEL_CONNECTS = 64
# TensorFlow's own start after the rendezvous gets at least this long.
_MIN_START_SECONDS = 30.0


class Task(NamedTuple):
  job: str
  index: int
  address: str

  def __str__(self) -> str:
    return f'{self.job} {self.index} ({self.address})'


def collective_tasks(tf_config: Dict[str, Any]) -> List[Task]:
  """The tasks of a (checked) TF_CONFIG that run the collectives, in order."""
  cluster_spec = tf_config['cluster']
  return [Task(job, index, address) for job in _COLLECTIVE_JOBS
          for index, address in enumerate(cluster_spec.get(job, []))]


def this_task(tf_config: Dict[str, Any]) -> Task:
  task = tf_config['task']
  job, index = task['type'], int(task['index'])
  return Task(job, index, tf_config['cluster'][job][index])


def split_address(address: str):
  """('host', port) of 'host:port' or '[v6]:port'."""
  host, port = address.rsplit(':', 1)
  return host.strip('[]'), int(port)


class _Listener:
  """A listening socket whose thread accepts and closes every connection.

  The queue of unaccepted connections is as long as the kernel allows (up
  to _BACKLOG: every peer of a 256-host slice probing at once) and the
  thread keeps it empty, so a probe never waits for a slot and reads a
  started worker as absent.
  """

  def __init__(self, server: socket.socket):
    self._server = server
    self.accepted = 0
    self._server.settimeout(_POLL_SECONDS)
    self._closed = threading.Event()
    self._thread = threading.Thread(target=self._drain, daemon=True)
    self._thread.start()

  def _drain(self) -> None:
    while not self._closed.is_set():
      try:
        connection, _ = self._server.accept()
      except OSError:   # socket.timeout included
        continue
      connection.close()
      self.accepted += 1

  def close(self) -> None:
    self._closed.set()
    self._thread.join()
    self._server.close()


def listen(address: str) -> _Listener:
  """Listens on the port of this worker's TF_CONFIG address.

  Bound on every interface, as TensorFlow's server binds; ClusterError
  naming the port when it cannot be bound.
  """
  _, port = split_address(address)
  try:
    if socket.has_dualstack_ipv6():
      return _Listener(socket.create_server(
          ('', port), family=socket.AF_INET6, dualstack_ipv6=True,
          backlog=_BACKLOG))
    return _Listener(socket.create_server(('', port), backlog=_BACKLOG))
  except OSError as error:
    raise ClusterError(
        f'This worker cannot listen on port {port}, its address {address} in '
        f'TF_CONFIG ({error.strerror or error}): another program, or an '
        f'earlier run of this worker, holds that port. Stop it, or give this '
        f'worker another port in TF_CONFIG (the same "cluster" on every '
        f'worker).') from None


def reachable(address: str) -> bool:
  """Whether something accepts TCP connections at `address` now."""
  try:
    with socket.create_connection(split_address(address),
                                  timeout=_CONNECT_SECONDS):
      return True
  except OSError:
    return False


def _describe(tasks: List[Task]) -> str:
  return ', '.join(str(task) for task in tasks)


def _raise_interrupted(signum, unused_frame):
  raise StartInterrupted(signum)


@contextlib.contextmanager
def _interruptible():
  """SIGTERM and Ctrl-C raise StartInterrupted (main thread only)."""
  previous = None
  if threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
  try:
    yield
  except KeyboardInterrupt:
    raise StartInterrupted(signal.SIGINT) from None
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def wait_for_peers(tf_config: Dict[str, Any], timeout: float, *,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep,
                   is_reachable: Callable[[str], bool] = reachable,
                   listen_on: Callable[[str], Any] = listen,
                   say: Callable[[str], None] = print) -> float:
  """Returns once every peer answered; the seconds left of `timeout`.

  Raises ClusterError naming the peers that did not answer within
  `timeout` seconds, or this worker's port when it cannot be bound;
  StartInterrupted on SIGTERM or Ctrl-C.
  """
  me = this_task(tf_config)
  peers = [task for task in collective_tasks(tf_config)
           if (task.job, task.index) != (me.job, me.index)]
  if me.job not in _COLLECTIVE_JOBS or not peers:
    return timeout
  start = clock()
  listener = listen_on(me.address)
  try:
    with _interruptible(), concurrent.futures.ThreadPoolExecutor(
        min(_PARALLEL_CONNECTS, len(peers))) as pool:
      missing, announced = peers, False
      while True:
        answered = list(pool.map(is_reachable,
                                 [task.address for task in missing]))
        missing = [task for task, up in zip(missing, answered) if not up]
        waited = clock() - start
        if not missing:
          return timeout - waited
        if waited >= timeout:
          raise ClusterError(
              f'{me.job} {me.index}: {_describe(missing)} did not start '
              f'within --cluster_start_timeout={timeout:g} seconds (nothing '
              f'answered at {"that address" if len(missing) == 1 else "those addresses"}). '
              f'Start every worker of TF_CONFIG with the same command, or '
              f'check the addresses and the network between the hosts; '
              f'nothing was written.')
        if not announced:
          say(f'{me.job} {me.index}: waiting up to {timeout:g} s for '
              f'{_describe(missing)} to start')
          announced = True
        sleep(_POLL_SECONDS)
  finally:
    listener.close()


def _give_up(message: str) -> None:
  """Ends the process from the watchdog thread: TensorFlow holds the main one."""
  sys.stdout.flush()
  print(f'error: {message}', file=sys.stderr, flush=True)
  os._exit(CLUSTER_FAILURE_STATUS)  # pylint: disable=protected-access


@contextlib.contextmanager
def deadline(seconds_left: float, tf_config: Dict[str, Any]):
  """TensorFlow's own start of the cluster, ended after `seconds_left`.

  The rendezvous saw every peer, so this normally takes seconds; a peer
  that died since, or a program other than the peer answering on its port,
  would leave TensorFlow waiting for an hour in C++, out of reach of
  Python's exceptions, so the watchdog ends the process with one line.
  """
  seconds = max(seconds_left, _MIN_START_SECONDS)
  me = this_task(tf_config)
  timer = threading.Timer(seconds, _give_up, args=(
      f'{me.job} {me.index}: every worker answered at its address, but '
      f'TensorFlow\'s cluster did not start within {seconds:g} s: a worker '
      f'died since, or another program answers at a worker\'s address '
      f'({_describe(collective_tasks(tf_config))}). Check every worker\'s '
      f'log and start them all again with the same command; nothing was '
      f'written.',))
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    timer.cancel()
