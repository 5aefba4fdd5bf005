"""The device loop (train.make_train_loop): one trace, means, and XLA.

A replica step that counts its own traces (a Python side effect runs only
while tracing) and adds its batch into a variable, so the number of steps
run, the metric means and the trace count can be read off exactly.
"""

import numpy as np
import tensorflow as tf

from mpl_tf import train


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
    loop = train.make_train_loop(strategy, step, jit_compile)
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
