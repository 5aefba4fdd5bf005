"""The device loop: many training steps per host call, metrics read once.

One call of `loop(iterator, num_steps)` runs `num_steps` steps in a single
`tf.function` (`tf.range` over `strategy.run`). What the host gets back is
one mean per metric over those steps, read once after the last step.

Why accumulator variables and not per-step values: a value returned by
`strategy.run` and reduced or summed outside it (the host's part of the
graph) leaves the accelerator at every step; on a TPU that is an outfeed and
a host round trip per step. Here each replica adds its step's metrics into a
sync-on-read variable of its own, on its own device, with no communication
at all; the replicas' sums are combined (an all-reduce across devices and
workers) only when the host reads them after the loop. Keras metrics and
orbit's trainers work the same way.
"""

from typing import Callable, Dict

import tensorflow as tf

_SUM = tf.VariableAggregation.SUM
_ON_READ = tf.VariableSynchronization.ON_READ


def make_train_loop(strategy: tf.distribute.Strategy,
                    replica_step: Callable, jit_compile: bool) -> Callable:
  """loop(iterator, num_steps) -> mean of every metric over those steps.

  `replica_step(batch)` returns a dict of scalar metrics. Each is averaged
  over the replicas (most are already global on every replica; the local
  ones, like the UDA mask rate, become global means) and over the steps.
  """

  # XLA compiles the replica step, not the loop: the loop reads the input
  # iterator, which XLA cannot compile (IteratorGetNext). Keras's jit_compile
  # does the same. On TPU everything inside strategy.run is compiled anyway.
  if jit_compile:
    replica_step = tf.function(replica_step, jit_compile=True,
                               autograph=False)

  # Metric name -> the replicas' running sums. Created at the first trace,
  # when the step's metric names are known, and kept for later calls.
  totals: Dict[str, tf.Variable] = {}

  # A tf.function of its own, so that its two calls below (the first step,
  # whose outputs name the metrics, and the loop body) share one trace: the
  # step is traced once per loop, not twice. The steps have no Python control
  # flow on tensors, so they are traced as written: AutoGraph's conversion of
  # the step and the networks' calls took 5-8 s of every start on 2 cores.
  @tf.function(autograph=False)
  def one_step(iterator):
    return strategy.run(replica_step, args=(next(iterator),))

  def add(metrics):
    # Replica context: each replica adds into its own copy, no all-reduce.
    for name, value in metrics.items():
      totals[name].assign_add(tf.cast(value, tf.float32))

  @tf.function
  def loop(iterator, num_steps):
    first = one_step(iterator)
    if not totals:
      _create_totals(strategy, first, totals)
    for total in totals.values():
      total.assign(tf.zeros_like(total))
    strategy.run(add, args=(first,))
    for _ in tf.range(num_steps - 1):
      strategy.run(add, args=(one_step(iterator),))
    # Cross-replica context: reading a sync-on-read SUM variable sums the
    # replicas' copies. This is the loop's one cross-replica reduction.
    count = tf.cast(num_steps * strategy.num_replicas_in_sync, tf.float32)
    return {name: total.read_value() / count
            for name, total in totals.items()}

  return loop


def _create_totals(strategy, metrics, totals) -> None:
  """One float32 sync-on-read SUM variable per metric, outside the graph."""
  with tf.init_scope(), strategy.scope():
    for name in metrics:
      totals[name] = tf.Variable(
          0.0, trainable=False, synchronization=_ON_READ, aggregation=_SUM,
          name='metric_total')
