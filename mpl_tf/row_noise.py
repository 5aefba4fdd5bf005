"""Rows of one global stateless uniform draw, each drawn by the replica that
uses it.

The sampled pseudo labels of a step are Gumbel-max draws whose noise is one
[N, K] uniform draw for the whole global unlabeled batch (N rows, K classes):
`tf.random.stateless_uniform([N, K], seed, alg='philox')` as TensorFlow's
CPU kernel computes it. Drawing that matrix on every replica and keeping its
own rows would cost each of R replicas R times the noise it uses (the
EfficientNet-L2 preset on 1,024 cores: 32,768 x 1,000 floats per core per
step, of which 32 x 1,000 are used).

Philox-4x32-10 (Salmon et al., SC 2011) is counter based: the kernel fills
element i of the flat draw with word i % 4 of Philox(key, counter + i // 4),
(key, counter) being the seed's (`StatelessRandomGetKeyCounter`). So any run
of rows can be drawn by itself: `uniform_rows` runs Philox at the counters of
rows [first_row, first_row + rows) only and returns exactly those rows of the
global draw, whatever N. An example's noise is then a function of (seed, its
row in the global batch): the same for any number of replicas and whichever
replica holds the row.

The rounds are int64 ops on 32-bit words (each 32 x 32-bit product in two
16-bit halves, so no value exceeds 2^49): exact integer arithmetic, so the
rows do not depend on the backend or on XLA (TPU steps are compiled), unlike
the stateless op itself, whose XLA lowering orders its outputs otherwise.
tests/test_row_noise.py checks the rows against TensorFlow's CPU kernel,
with and without XLA.
"""

from typing import List, Sequence, Union

import tensorflow as tf

_WORD = 0xFFFFFFFF
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)   # Philox-4x32's round multipliers
_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)     # its key schedule's increments
_ROUNDS = 10
_WORDS_PER_BLOCK = 4                      # outputs of one Philox call
_MANTISSA = 0x7FFFFF                      # the 23 bits a float32 in [0, 1) gets

Size = Union[int, tf.Tensor]


def _and(x, mask):
  return tf.bitwise.bitwise_and(x, tf.constant(mask, tf.int64))


def _shift_right(x, bits):
  return tf.bitwise.right_shift(x, tf.constant(bits, tf.int64))


def _words(value: tf.Tensor) -> List[tf.Tensor]:
  """The (low, high) 32-bit words of a 64-bit integer, as int64 in [0, 2^32)."""
  if value.dtype == tf.uint64:
    value = tf.bitcast(value, tf.int64)
  value = tf.cast(value, tf.int64)
  return [_and(value, _WORD), _and(_shift_right(value, 32), _WORD)]


def _multiply_high_low(multiplier: int, word: tf.Tensor):
  """(high, low) 32-bit words of multiplier * word (both below 2^32)."""
  low_half = word * (multiplier & 0xFFFF)                        # < 2^48
  total = word * (multiplier >> 16) + _shift_right(low_half, 16)  # < 2^49
  low = tf.bitwise.bitwise_or(
      tf.bitwise.left_shift(_and(total, 0xFFFF), tf.constant(16, tf.int64)),
      _and(low_half, 0xFFFF))
  return _shift_right(total, 16), low


def _philox(key: Sequence[tf.Tensor], counter: Sequence[tf.Tensor]):
  """Philox-4x32-10 of 128-bit counters (4 words), as TensorFlow's kernel."""
  key0, key1 = key
  c0, c1, c2, c3 = counter
  for _ in range(_ROUNDS):
    high0, low0 = _multiply_high_low(_MULTIPLIERS[0], c0)
    high1, low1 = _multiply_high_low(_MULTIPLIERS[1], c2)
    c0, c1, c2, c3 = (tf.bitwise.bitwise_xor(tf.bitwise.bitwise_xor(
        high1, c1), key0), low1, tf.bitwise.bitwise_xor(
            tf.bitwise.bitwise_xor(high0, c3), key1), low0)
    key0 = _and(key0 + _KEY_STEPS[0], _WORD)
    key1 = _and(key1 + _KEY_STEPS[1], _WORD)
  return c0, c1, c2, c3


def _advanced(counter: Sequence[tf.Tensor], blocks: tf.Tensor):
  """counter + blocks, a 128-bit sum over 4 words (blocks >= 0, int64)."""
  words, carry = [], None
  for word, addend in zip(counter, _words(blocks) + [0, 0]):
    total = word + addend if carry is None else word + addend + carry
    carry = _shift_right(total, 32)
    words.append(_and(total, _WORD))
  return words


def philox_rows(key: tf.Tensor, counter: tf.Tensor, first_row: Size,
                rows: Size, columns: Size) -> tf.Tensor:
  """Rows of `tf.raw_ops.StatelessRandomUniformV2(shape=[N, columns], key,
  counter, alg=Philox)`, float32 in [0, 1): rows [first_row, first_row +
  rows), for any N beyond them.

  key: uint64 [1]; counter: uint64 [2] (StatelessRandomGetKeyCounter's).
  Static `rows` and `columns` give a static shape (XLA needs one); first_row
  may be a tensor (a replica id times the rows per replica).
  """
  size = rows * columns   # a Python int when both are (a static shape)
  if tf.is_tensor(size):
    size = tf.cast(size, tf.int64)
  first = tf.cast(first_row, tf.int64) * tf.cast(columns, tf.int64)
  first_block = first // _WORDS_PER_BLOCK
  # Blocks enough for `size` words starting at any offset 0..3 in a block.
  blocks = first_block + tf.range(size // _WORDS_PER_BLOCK + 2,
                                  dtype=tf.int64)
  counter_words = _words(counter[0]) + _words(counter[1])
  outputs = _philox(_words(key[0]), _advanced(counter_words, blocks))
  flat = tf.reshape(tf.stack(outputs, axis=1), [-1])   # the draw's order
  offset = first - first_block * _WORDS_PER_BLOCK
  bits = tf.slice(flat, tf.reshape(offset, [1]),
                  tf.reshape(tf.cast(size, tf.int64), [1]))
  # TensorFlow's float of a word: 1.m (its 23 low bits as m) minus 1.
  unit = tf.cast(_and(bits, _MANTISSA), tf.float32) * (2.0 ** -23)
  return tf.reshape(unit, [rows, columns])


def uniform_rows(seed: tf.Tensor, first_row: Size, rows: Size,
                 columns: Size, minval: float = 0.0,
                 maxval: float = 1.0) -> tf.Tensor:
  """Rows [first_row, first_row + rows) of `tf.random.stateless_uniform(
  [N, columns], seed, minval, maxval, alg='philox')` (float32, the CPU
  kernel's bits, any N beyond them), drawing only those rows.

  seed: int32 or int64 [2], as for tf.random.stateless_uniform.
  """
  key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=seed)
  unit = philox_rows(key, counter, first_row, rows, columns)
  minval = tf.constant(minval, tf.float32)
  maxval = tf.constant(maxval, tf.float32)
  return unit * (maxval - minval) + minval
