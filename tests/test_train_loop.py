"""The device loop (device_loop.make_train_loop): one trace, means, XLA.

And what crosses the loop: no metric value is carried from step to step
(so none leaves the device per step); the replicas' sums meet once, when
the host reads them after the loop.

A replica step that counts its own traces (a Python side effect runs only
while tracing) and adds its batch into a variable, so the number of steps
run, the metric means and the trace count can be read off exactly.
"""

import numpy as np
import tensorflow as tf

from mpl_tf import device_loop
from mpl_tf import distribute
from mpl_tf.config import RunConfig


class CountingStep:
  """Adds each batch's sum to `total`; returns it and the batch mean."""

  def __init__(self):
    self.traces = 0
    self.total = tf.Variable(0.0)

  def __call__(self, batch):
    self.traces += 1
    self.total.assign_add(tf.reduce_sum(batch))
    return {'total': tf.identity(self.total),
            'batch_mean': tf.reduce_mean(batch)}


def _iterator(strategy):
  # Batches 0, 1, 2, ...: each a [2] vector [i, i].
  dataset = tf.data.Dataset.range(100).map(
      lambda i: tf.fill([2], tf.cast(i, tf.float32)))
  return iter(strategy.experimental_distribute_dataset(dataset))


class TrainLoopTest(tf.test.TestCase):

  def _check(self, jit_compile):
    strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
    with strategy.scope():
      step = CountingStep()
    loop = device_loop.make_train_loop(strategy, step, jit_compile)
    iterator = _iterator(strategy)
    first = loop(iterator, tf.constant(3))    # batches 0, 1, 2
    second = loop(iterator, tf.constant(2))   # batches 3, 4
    # The running total after each step: 0, 2, 6 then 12, 20 (sum of [i, i]).
    self.assertAllClose(first['total'], np.mean([0, 2, 6]))
    self.assertAllClose(first['batch_mean'], np.mean([0, 1, 2]))
    self.assertAllClose(second['total'], np.mean([12, 20]))
    self.assertAllClose(second['batch_mean'], np.mean([3, 4]))
    # One trace of the step for both calls: not one for the loop's first
    # step and another for its body, and none for a new step count.
    self.assertEqual(step.traces, 1)

  def test_steps_are_traced_once_and_averaged(self):
    self._check(jit_compile=False)

  def test_xla_compiles_the_step_and_reads_the_iterator_outside(self):
    # Before the step alone was compiled, jit_compile=True failed on the
    # loop's IteratorGetNext, which XLA cannot compile.
    self._check(jit_compile=True)


def _float_loop_variables(loop, iterator):
  """The float values a `tf.range` loop of `loop` carries between steps."""
  graph = loop.get_concrete_function(iterator, tf.constant(2)).graph
  whiles = [op for op in graph.get_operations()
            if op.type in ('While', 'StatelessWhile')]
  assert len(whiles) == 1, [op.type for op in whiles]
  return [t for t in whiles[0].inputs if t.dtype.is_floating]


class TwoReplicaLoopTest(tf.test.TestCase):
  """MirroredStrategy on the two logical CPUs of tests/conftest.py."""

  def test_replica_local_metrics_become_global_means(self):
    strategy = distribute.get_strategy(RunConfig(strategy='mirrored'))
    self.assertEqual(strategy.num_replicas_in_sync, 2)

    def replica_step(batch):
      replica = tf.distribute.get_replica_context().replica_id_in_sync_group
      return {'replica': tf.cast(replica, tf.float32),
              'batch_mean': tf.reduce_mean(batch)}

    loop = device_loop.make_train_loop(strategy, replica_step, False)
    # Global batches [i, i + 100]: replica 0 gets i, replica 1 gets i + 100.
    dataset = tf.data.Dataset.range(50).map(
        lambda i: tf.cast(tf.stack([i, i + 100]), tf.float32))
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    self.assertEqual(_float_loop_variables(loop, iterator), [])
    first = loop(iterator, tf.constant(3))    # global batches 0, 1, 2
    second = loop(iterator, tf.constant(1))   # 3
    self.assertAllClose(first['replica'], 0.5)
    self.assertAllClose(first['batch_mean'], np.mean([0, 1, 2]) + 50)
    self.assertAllClose(second['batch_mean'], 3 + 50)
