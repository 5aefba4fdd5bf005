"""The whole training loop on two replicas equals the loop on one device.

Two logical CPU devices (tests/conftest.py) give a real MirroredStrategy.
The input pipeline cuts each global batch into the replicas' consecutive
shares, batch norm is synchronised, losses are divided by the global batch,
gradients summed where the step says, and sampled pseudo labels are drawn by
global row: so two replicas must train exactly like one device. Dropout is
off here, because each replica draws its own dropout masks (replica 0 those
of one device, replica 1 others; ReplicaRandomnessTest).
"""

import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from mpl_tf import distribute
from mpl_tf import train
from mpl_tf.config import RunConfig
from mpl_tf.models import random_states, replica_distinct_randomness
from tests.test_train import _config, _variables

_NETWORK_PREFIXES = ('teacher/', 'student/', 'ema_student/',
                     'teacher_optimizer/', 'student_optimizer/', 'step/')


class TwoReplicaLoopTest(tf.test.TestCase):

  def test_mirrored_run_trains_like_one_device(self):
    data_dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, data_dir, ignore_errors=True)
    checkpoints, results = {}, {}
    for strategy in ('one_device', 'mirrored'):
      model_dir = tempfile.mkdtemp()
      self.addCleanup(shutil.rmtree, model_dir, ignore_errors=True)
      # Keras's batch norm on both sides, so both sum the same way: on one
      # replica the default fused kernel (two-pass moments) would run, and
      # its rounding differs from the mirrored run's one-pass sums of x and
      # x^2 (3e-6 on a 0.1 weight after two steps). The fused kernel against
      # the two-replica path is SyncBatchNormTest's (test_models.py).
      config = _config(model_dir, data_dir, f'--strategy={strategy}',
                       '--batch_norm_kernel=keras',
                       '--dropout_rate=0', '--nosupervised_baseline',
                       '--eval_every=0', '--num_steps=2', '--steps_per_loop=2',
                       '--checkpoint_every=2', '--eval_batch_size=64')
      results[strategy] = train.run(config)
      checkpoints[strategy] = tf.train.latest_checkpoint(
          os.path.join(model_dir, 'checkpoints'))
    for prefix in _NETWORK_PREFIXES:
      single = _variables(checkpoints['one_device'], prefix)
      mirrored = _variables(checkpoints['mirrored'], prefix)
      self.assertNotEmpty(single, prefix)
      self.assertEqual(set(single), set(mirrored))
      # Weights and batch-norm statistics agree to float32 rounding (2e-7
      # measured). The momentum accumulators hold raw gradients, where the
      # order of float32 sums (per replica, then across replicas) shows more:
      # up to 3e-4 of 0.5 in the teacher's, whose batch norm sums the most.
      tolerance = (dict(rtol=1e-3, atol=5e-4) if 'optimizer' in prefix else
                   dict(rtol=1e-5, atol=1e-6))
      for name, value in single.items():
        self.assertAllClose(mirrored[name], value, msg=name, **tolerance)
    for network in ('mpl_ema_student', 'mpl_teacher'):
      for split in ('validation', 'test'):
        self.assertEqual(results['mirrored'][network][split]['count'], 100)
        self.assertAllClose(results['mirrored'][network][split]['top1'],
                            results['one_device'][network][split]['top1'])


def _dropout_with_state(state) -> np.ndarray:
  """What one Dropout(0.5) layer on one device gives ones with this state."""
  layer = keras.layers.Dropout(0.5)
  layer.build((2, 64))
  layer.seed_generator.state.assign(state)
  return layer(tf.ones([2, 64]), training=True).numpy()


class ReplicaRandomnessTest(tf.test.TestCase):
  """Dropout masks are drawn per replica; seed states stay mirrored."""

  def test_two_replicas_draw_different_masks(self):
    strategy = distribute.get_strategy(RunConfig(strategy='mirrored'))
    self.assertEqual(strategy.num_replicas_in_sync, 2)
    with strategy.scope():
      model = keras.Sequential([keras.Input((64,)), keras.layers.Dropout(0.5)])
    states = random_states(model)
    self.assertLen(states, 1)
    before = states[0].numpy()
    step = replica_distinct_randomness(
        lambda images: model(images, training=True), states)

    @tf.function
    def run():
      return strategy.run(step, args=(tf.ones([2, 64]),))

    first, second = [v.numpy() for v in
                     strategy.experimental_local_results(run())]
    # Same input, different masks (each keeps about half of 128 values).
    self.assertNotAllEqual(first == 0, second == 0)
    # Replica 0 draws exactly what one device draws from the same state.
    self.assertAllEqual(first, _dropout_with_state(before))
    # The state moved on by one draw, alike on both replicas (mirrored).
    after = [v.numpy() for v in strategy.experimental_local_results(
        states[0].value)]
    self.assertAllEqual(after[0], after[1])
    self.assertAllEqual(after[0], before + [0, 1])


if __name__ == '__main__':
  tf.test.main()
