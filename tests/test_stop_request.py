"""SIGTERM ends a run within stop_check_steps steps, after a checkpoint.

This is how a preempted VM, a TPU VM's maintenance event or
tpu_scripts/stop.sh stop a run (cluster.StopRequest): the step it stopped at
is saved even when it is not a multiple of checkpoint_every, and the
process's own SIGTERM handler comes back afterwards. Resuming from that
checkpoint is the ordinary resume (tests/test_train.py).
"""

import dataclasses
import json
import os
import re
import signal
import threading
import time
from unittest import mock

import tensorflow as tf

from mpl_tf import cluster
from mpl_tf import evaluations
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
    # One device loop of the whole run: the stop is honoured inside it,
    # after at most stop_check_steps (1) steps, not at its end.
    config = _config(model_dir, self.data_dir, '--nosupervised_baseline',
                     '--eval_every=0', f'--num_steps={_NUM_STEPS}',
                     f'--steps_per_loop={_NUM_STEPS}', '--stop_check_steps=1',
                     f'--checkpoint_every={_NUM_STEPS}')
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

    # Resumed with an evaluation at the next step (eval_every and
    # steps_per_loop may change on resume), and a SIGTERM that arrives
    # during that evaluation: the run ends right after it, at that step,
    # saved although it is no checkpoint step, with the evaluation kept.
    real_record = evaluations.Evaluations.record

    def record_then_signal(evaluations_self, at_step):
      os.kill(os.getpid(), signal.SIGTERM)
      return real_record(evaluations_self, at_step)

    resumed = dataclasses.replace(config, run=dataclasses.replace(
        config.run, steps_per_loop=1, eval_every=step + 1))
    with mock.patch.object(evaluations.Evaluations, 'record',
                           record_then_signal):
      with self.assertRaisesRegex(cluster.StopRequested,
                                  f'at step {step + 1} of'):
        train.run(resumed)
    self.assertEqual(tf.train.latest_checkpoint(directory),
                     os.path.join(directory, f'ckpt-{step + 1}'))
    with open(os.path.join(model_dir, 'eval_history.json')) as f:
      self.assertEqual([e['step'] for e in json.load(f)], [step + 1])


if __name__ == '__main__':
  tf.test.main()
