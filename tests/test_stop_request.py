"""SIGTERM ends a run at the next device-loop boundary, after a checkpoint.

This is how a preempted VM, a TPU VM's maintenance event or
tpu_scripts/stop.sh stop a run (cluster.StopRequest): the step it stopped at
is saved even when it is not a multiple of checkpoint_every, and the
process's own SIGTERM handler comes back afterwards. Resuming from that
checkpoint is the ordinary resume (tests/test_train.py).
"""

import os
import re
import signal
import threading
import time

import tensorflow as tf

from mpl_tf import cluster
from mpl_tf import train
from tests.test_train import _config, _tempdir
from tests.testing import DataDirTestCase

_NUM_STEPS = 10


def _signal_when(path_pattern: str, timeout: float = 300) -> threading.Thread:
  """Sends this process SIGTERM once a file matching the glob appears."""

  def wait_then_signal():
    deadline = time.time() + timeout
    while not tf.io.gfile.glob(path_pattern) and time.time() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  thread = threading.Thread(target=wait_then_signal, daemon=True)
  thread.start()
  return thread


class StopRequestTest(DataDirTestCase):

  def test_sigterm_checkpoints_the_current_step_and_ends_the_run(self):
    model_dir = _tempdir(self)
    config = _config(model_dir, self.data_dir, '--nosupervised_baseline',
                     '--eval_every=0', f'--num_steps={_NUM_STEPS}',
                     '--steps_per_loop=1', f'--checkpoint_every={_NUM_STEPS}')
    handler_before = signal.getsignal(signal.SIGTERM)
    # The train writer's events file exists once the loop is about to start
    # (and the run's handler is installed before it).
    thread = _signal_when(os.path.join(model_dir, 'logs', 'train', 'events*'))
    with self.assertRaises(cluster.StopRequested) as stopped:
      train.run(config)
    thread.join()
    self.assertIs(signal.getsignal(signal.SIGTERM), handler_before)
    step = int(re.search(r'at step (\d+) of', str(stopped.exception)).group(1))
    self.assertBetween(step, 1, _NUM_STEPS - 1)
    directory = os.path.join(model_dir, 'checkpoints')
    # Saved although checkpoint_every is the whole run.
    self.assertEqual(tf.train.latest_checkpoint(directory),
                     os.path.join(directory, f'ckpt-{step}'))
    self.assertFalse(tf.io.gfile.exists(os.path.join(model_dir,
                                                     'results.json')))


if __name__ == '__main__':
  tf.test.main()
