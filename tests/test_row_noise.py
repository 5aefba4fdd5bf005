"""Pseudo-label noise drawn per replica equals the global batch's, by row.

Each replica draws the Gumbel noise of its own rows only
(`row_noise.uniform_rows`); the reference is TensorFlow's own stateless
kernel drawing the whole global batch at once, which the code no longer
runs. Replica layouts are simulated (replica r of R holds rows [r*b,
(r+1)*b) of the global batch, as the input pipeline cuts it): pure functions,
no strategy. The real two-replica step is tests/test_mpl_step.py's
MirroredStrategyTest.
"""

import numpy as np
import tensorflow as tf

from mpl_tf import losses
from mpl_tf import row_noise

_SEED = tf.constant([5, 11], tf.int64)   # (step, run seed), as MplStep's
_PHILOX = 1                               # tf.raw_ops' id of the algorithm


def _global_uniform(seed, rows, columns, minval=0.0, maxval=1.0):
  """The whole [rows, columns] draw, by TensorFlow's kernel."""
  return tf.random.stateless_uniform([rows, columns], seed, minval, maxval,
                                     alg='philox').numpy()


def _per_replica(draw, global_rows, replicas):
  """Concatenation of draw(first_row, rows) over `replicas` equal shares."""
  share = global_rows // replicas
  return np.concatenate([np.asarray(draw(r * share, share))
                         for r in range(replicas)])


class UniformRowsTest(tf.test.TestCase):

  def test_each_replica_draws_its_rows_of_the_global_draw(self):
    # Rows x classes not a multiple of Philox's 4 words, so most replicas
    # start inside a block (1,000 classes: the ImageNet presets').
    for global_rows, classes in ((12, 10), (12, 3), (8, 1000)):
      expected = _global_uniform(_SEED, global_rows, classes)
      for replicas in (1, 2, 4):
        drawn = _per_replica(
            lambda first, rows: row_noise.uniform_rows(
                _SEED, first, rows, classes), global_rows, replicas)
        self.assertAllEqual(drawn, expected,
                            msg=f'{global_rows}x{classes}, R={replicas}')

  def test_minval_and_maxval_as_tensorflow_applies_them(self):
    # Exactly what the Gumbel noise takes: [1e-20, 1) (log(-log u) finite).
    expected = _global_uniform(_SEED, 6, 10, 1e-20, 1.0)
    self.assertAllEqual(
        row_noise.uniform_rows(_SEED, 3, 3, 10, 1e-20, 1.0), expected[3:])

  def test_counter_carries_across_its_words(self):
    # The 128-bit counter, advanced by each row's blocks, carries from word to
    # word; seeds give counters whose low word is 0, so set them directly.
    key = tf.constant([0x0123456789ABCDEF], tf.uint64)
    top = 2**64 - 1
    for counter in ([top - 5, 7], [top - 5, 2**32 - 1], [top - 1, top],
                    [2**32 - 3, 0]):
      counter = tf.constant(counter, tf.uint64)
      expected = tf.raw_ops.StatelessRandomUniformV2(
          shape=[10, 5], key=key, counter=counter, alg=_PHILOX).numpy()
      for replicas in (1, 2):
        drawn = _per_replica(lambda first, rows: row_noise.philox_rows(
            key, counter, first, rows, 5), 10, replicas)
        self.assertAllEqual(drawn, expected, msg=f'{counter}, R={replicas}')

  def test_a_replica_computes_only_its_own_rows(self):
    # The EfficientNet-L2 preset on 1,024 cores: 32 of the 32,768 rows of
    # 1,000 classes per core. Traced, not run: every tensor of the last
    # replica's draw has a static shape, and none is larger than its rows'
    # 32,000 words plus the 2 Philox blocks (8 words) at their ends, whatever
    # its first row (a tensor here, as replica_id * rows is in the step).
    rows, classes = 32, 1000
    draw = tf.function(lambda first: row_noise.uniform_rows(
        _SEED, first, rows, classes, 1e-20, 1.0))
    graph = draw.get_concrete_function(
        tf.TensorSpec([], tf.int32)).graph
    sizes = []
    for op in graph.get_operations():
      for output in op.outputs:
        self.assertTrue(output.shape.is_fully_defined(), msg=op.name)
        sizes.append(output.shape.num_elements())
    self.assertEqual(max(sizes), rows * classes + 8)

  def test_same_bits_under_xla(self):
    # TPU steps are compiled: the rows must not change there (the stateless
    # op's own XLA lowering orders its outputs otherwise).
    compiled = tf.function(
        lambda first: row_noise.uniform_rows(_SEED, first, 3, 10),
        jit_compile=True)
    expected = _global_uniform(_SEED, 12, 10)
    for first in (0, 5, 9):
      self.assertAllEqual(compiled(tf.constant(first)),
                          expected[first:first + 3])


class SampledPseudoLabelsTest(tf.test.TestCase):

  def test_labels_of_a_global_batch_do_not_depend_on_the_replicas(self):
    global_rows, classes = 16, 5
    # Flat logits: the noise, not the teacher, decides most labels.
    logits = tf.constant(np.random.default_rng(0).normal(
        0.0, 0.3, [global_rows, classes]), tf.float32)
    # The Gumbel-max draw, recomputed in numpy from the global draw.
    uniform = _global_uniform(_SEED, global_rows, classes, 1e-20, 1.0)
    expected = np.argmax(logits.numpy() - np.log(-np.log(uniform)), axis=-1)
    self.assertGreater(len(np.unique(expected)), 2)
    for replicas in (1, 2, 4):

      def labels(first, rows):
        targets, ids = losses.pseudo_labels(
            logits[first:first + rows], 'sampled', _SEED, first_row=first)
        self.assertAllEqual(targets, tf.one_hot(ids, classes))
        return ids

      self.assertAllEqual(_per_replica(labels, global_rows, replicas),
                          expected, msg=f'R={replicas}')

  def test_another_step_draws_other_labels(self):
    logits = tf.zeros([16, 5])
    _, first = losses.pseudo_labels(logits, 'sampled', _SEED)
    _, second = losses.pseudo_labels(logits, 'sampled', _SEED + [1, 0])
    self.assertNotAllEqual(first, second)


if __name__ == '__main__':
  tf.test.main()
