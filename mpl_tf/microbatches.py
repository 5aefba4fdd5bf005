"""K chunks of each replica's batch in turn, one update: the paper's batch
on fewer devices.

`MplConfig.microbatches = K` makes every training step (MPL, UDA,
supervised, finetuning) run the blocks of its step that read the batch on
K equal chunks of this replica's batch, one after another inside the
compiled step, sum what they return, and update the networks once. The
numbers are exactly those of K times as many replicas under
MirroredStrategy, each holding one chunk, without synchronized batch norm:

- Losses are divided by the global batch, so summing a block's losses and
  gradients over the chunks is what the cross-replica sum does over
  replicas; the step's own cross-replica sum follows, once.
- Chunk k of replica r runs as replica r*K+k of a K*R-replica run: its
  dropout and stochastic-depth masks are that replica's (its seed states
  shifted by `models.replica_seed_shift`, on top of the shift of replica r
  that `models.replica_distinct_randomness` applies around the step), and
  the step draws pseudo-label noise by row of the global batch, which is
  the same rows whoever holds them (row_noise.py).
- Batch-norm statistics are each chunk's own. The moving statistics: Keras 3
  creates them with aggregation NONE, so under MirroredStrategy each replica
  updates its own copy from its own batch and the copies drift apart (the
  host reads and saves replica 0's; an evaluation under the strategy has
  each replica use its own). Here every chunk updates
  from the same start and the statistics become the mean of the K updated
  copies: the update being affine, that is exactly the mean of the K
  replicas' copies, at every step (every chunk's statistics count, as with
  tf.keras's MEAN aggregation). Passes that restore their statistics (the
  measuring passes) contribute nothing, as with one chunk.

Synchronized batch norm would need the statistics of the whole batch, which
exists here only chunk by chunk: K > 1 refuses it (config_checks.validate, and
`Microbatches` for networks built elsewhere).

Memory: one chunk's activations at a time; beyond that, one sum per
gradient (the accumulators) and whatever small per-chunk outputs a block
keeps (the teacher's logits). The chunks run in a tf.while_loop with
parallel_iterations=1, chunk 0 before it (its outputs give the sums their
structure and dtypes); both call one tf.function of a chunk, so each block
is traced once, whatever K.

K=1 calls each block once on the whole batch, adding no op: the steps'
ops are those they had before microbatches existed.
"""

from typing import Any, Callable, Sequence

import keras
import tensorflow as tf

from mpl_tf.models import (batch_norm_statistics, random_states,
                           replica_seed_shift)


def synchronized_batch_norm_layers(model: keras.Model) -> list:
  """The names of a network's batch-norm layers that sync across replicas."""
  return [layer.name for layer in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
          if isinstance(layer, keras.layers.BatchNormalization) and
          layer.synchronized]


class Microbatches:
  """Runs a step's blocks on K chunks of the replica's batch, in turn.

  `models` are the networks the blocks run (their seed states and
  batch-norm moving statistics are handled per chunk as described above).
  """

  def __init__(self, count: int, models: Sequence[keras.Model]):
    if int(count) != count or count < 1:
      raise ValueError(f'microbatches={count} must be a positive integer.')
    self.count = int(count)
    models = [model for model in models if model is not None]
    if self.count > 1:
      synchronized = [name for model in models
                      for name in synchronized_batch_norm_layers(model)]
      if synchronized:
        raise ValueError(
            f'microbatches={self.count} computes batch-norm statistics per '
            f'chunk, but the batch-norm layers {synchronized[:3]} '
            f'synchronize theirs across replicas; build the networks with '
            f'synchronized=False (--nosync_batch_norm) or use '
            f'microbatches=1.')
    self._seed_states = random_states(*models)
    self._statistics = [variable for model in models
                        for variable in batch_norm_statistics(model)]

  def sum(self, block: Callable[[Any], Any], inputs) -> Any:
    """block(chunk) summed over the chunks of `inputs` (K=1: block(inputs)).

    `inputs` is a nest of tensors whose first dimension is this replica's
    batch; `block` returns a nest of tensors (no None).
    """
    if self.count == 1:
      return block(inputs)
    return self._loop(block, inputs, concatenate=False)

  def concat(self, block: Callable[[Any], Any], inputs) -> Any:
    """block(chunk) concatenated over the chunks, along the first dimension.

    For per-example outputs (K=1: block(inputs)).
    """
    if self.count == 1:
      return block(inputs)
    return self._loop(block, inputs, concatenate=True)

  def mean(self, total: tf.Tensor) -> tf.Tensor:
    """The mean over chunks of a per-chunk fraction, from its sum.

    The chunks are equal, so it is the replica's fraction (K=1: as it is).
    """
    if self.count == 1:
      return total
    return total / tf.cast(self.count, total.dtype)

  def _split(self, tensor) -> tf.Tensor:
    """[n, ...] -> [K, n / K, ...]: chunk k holds rows k*n/K .. (k+1)*n/K."""
    tensor = tf.convert_to_tensor(tensor)
    rows = tensor.shape[0]
    if rows is not None and rows % self.count:
      raise ValueError(f'a batch of {rows} rows does not split into '
                       f'microbatches={self.count} equal chunks.')
    chunks = tf.reshape(tensor, tf.concat(
        [[self.count, -1], tf.shape(tensor)[1:]], axis=0))
    chunks.set_shape([self.count, None if rows is None else
                      rows // self.count] + tensor.shape[1:])
    return chunks

  def _joined(self, chunks: tf.Tensor) -> tf.Tensor:
    """[K, m, ...] -> [K * m, ...]."""
    joined = tf.reshape(chunks, tf.concat([[-1], tf.shape(chunks)[2:]], 0))
    rows = chunks.shape[1]
    joined.set_shape([None if rows is None else rows * self.count] +
                     chunks.shape[2:])
    return joined

  def _loop(self, block, inputs, concatenate: bool):
    chunked = tf.nest.map_structure(self._split, inputs)
    context = tf.distribute.get_replica_context()
    replica = 0 if context is None else context.replica_id_in_sync_group
    seeds_before = [tf.identity(state.value) for state in self._seed_states]
    statistics_before = [tf.identity(variable.value)
                         for variable in self._statistics]

    def one_chunk(index):
      """block on chunk `index`, run as replica r*K+index would run it.

      Replica r's states are already shifted by r (around the step), so the
      chunk adds the shift of r*K+index - r. Returns block's outputs, the
      seed states less that shift (the same after every chunk: each draws
      as often) and how far the chunk moved each moving statistic.
      """
      shift = replica_seed_shift(
          replica * (self.count - 1) + index,
          self._seed_states[0].dtype if self._seed_states else tf.int64)
      for state, before in zip(self._seed_states, seeds_before):
        state.assign(before + tf.cast(shift, state.dtype))
      for variable, before in zip(self._statistics, statistics_before):
        variable.assign(before)
      chunk = tf.nest.map_structure(lambda t: tf.gather(t, index), chunked)
      outputs = tf.nest.map_structure(tf.convert_to_tensor, block(chunk))
      with tf.control_dependencies(tf.nest.flatten(outputs)):
        seeds = [tf.identity(state.value) - tf.cast(shift, state.dtype)
                 for state in self._seed_states]
        moved = [tf.identity(variable.value) - before for variable, before
                 in zip(self._statistics, statistics_before)]
      return outputs, seeds, moved

    # One trace of the chunk, called for chunk 0 and in the loop's body.
    one_chunk = tf.function(one_chunk, autograph=False)
    outputs, seeds, moved = one_chunk(tf.constant(0))
    if concatenate:
      outputs = tf.nest.map_structure(
          lambda t: tf.TensorArray(t.dtype, size=self.count,
                                   element_shape=t.shape).write(0, t),
          outputs)

    def body(index, carried, _, moved_so_far):
      outputs, seeds, moved = one_chunk(index)
      if concatenate:
        carried = tf.nest.map_structure(
            lambda array, t: array.write(index, t), carried, outputs)
      else:
        carried = tf.nest.map_structure(tf.add, carried, outputs)
      return (index + 1, carried, seeds,
              [a + b for a, b in zip(moved_so_far, moved)])

    _, outputs, seeds, moved = tf.while_loop(
        lambda index, *_: index < self.count, body,
        (tf.constant(1), outputs, seeds, moved), parallel_iterations=1)
    for state, value in zip(self._seed_states, seeds):
      state.assign(value)
    for variable, before, total in zip(self._statistics, statistics_before,
                                       moved):
      variable.assign(before + total / tf.cast(self.count, total.dtype))
    if concatenate:
      outputs = tf.nest.map_structure(
          lambda array: self._joined(array.stack()), outputs)
    return outputs
