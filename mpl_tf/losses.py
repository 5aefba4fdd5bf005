"""Loss terms of MPL and UDA as pure tensor functions.

Every function returns a per-replica *sum* divided by a *global* count, so
that summing the gradients over replicas gives the gradient of the global-batch
mean (the released code does the same: local sum / global batch, then a
cross-replica sum of the gradients).
"""

import tensorflow as tf

from mpl_tf import config as config_lib
from mpl_tf import config_checks
from mpl_tf import row_noise

# Keeps log(-log(u)) finite for the Gumbel noise of sampled pseudo labels.
_TINY = 1e-20


def smooth_labels(target_probs: tf.Tensor, smoothing: float) -> tf.Tensor:
  """(1 - s) * p + s / K; also applied to soft targets, as tf.losses does."""
  if not smoothing:
    return target_probs
  num_classes = tf.cast(tf.shape(target_probs)[-1], target_probs.dtype)
  return (1.0 - smoothing) * target_probs + smoothing / num_classes


def cross_entropy_per_example(target_probs: tf.Tensor,
                              logits: tf.Tensor) -> tf.Tensor:
  """-sum_k p_k log softmax(logits)_k for every row; targets are constants."""
  target_probs = tf.stop_gradient(tf.cast(target_probs, logits.dtype))
  return -tf.reduce_sum(target_probs * tf.nn.log_softmax(logits), axis=-1)


def cross_entropy(target_probs: tf.Tensor, logits: tf.Tensor,
                  global_count: int, smoothing: float = 0.0) -> tf.Tensor:
  """Sum of per-example CE over this replica, divided by the global count."""
  per_example = cross_entropy_per_example(
      smooth_labels(target_probs, smoothing), logits)
  return tf.reduce_sum(per_example) / tf.cast(global_count, logits.dtype)


def _static_or_dynamic_shape(matrix: tf.Tensor):
  """[rows, columns] of a matrix: Python ints where static (XLA's need)."""
  dynamic = tf.shape(matrix)
  return [dynamic[i] if size is None else size
          for i, size in enumerate(matrix.shape.as_list())]


def one_hot(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
  return tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)


def pseudo_labels(teacher_logits: tf.Tensor, mode: str, seed: tf.Tensor,
                  first_row=0):
  """Draws the pseudo label y_hat from the teacher's distribution P(.|x_u).

  Sampling uses the Gumbel-max trick, argmax(logits + Gumbel noise), which
  draws exactly from softmax(logits). The noise of row g of the global batch
  is row g of one stateless [N, K] uniform draw from `seed`, and each replica
  draws only its own rows (`row_noise.uniform_rows`), so an example's label
  depends on (seed, step, its row in the global batch) only: one device and
  any number of replicas draw the same labels, a resumed run draws the labels
  it would have drawn, and no replica draws the other replicas' noise.

  Args:
    teacher_logits: [N, K] teacher logits on this replica's unlabeled view.
    mode: 'sampled' (y_hat ~ P, Algorithm 1), 'argmax' (the mode of P) or
      'soft' (P itself, the released code).
    seed: int64 [2] seed of the stateless sampler (run seed and step).
    first_row: this replica's first row in the global unlabeled batch.

  Returns:
    (target_probs [N, K], label_ids [N] int32). Both carry no gradient. For
    'soft' the ids are the argmax, used only for logging.
  """
  config_checks.check_choice('pseudo_label', mode, config_lib.PSEUDO_LABELS)
  teacher_logits = tf.stop_gradient(teacher_logits)
  if mode == 'sampled':
    rows, classes = _static_or_dynamic_shape(teacher_logits)
    uniform = row_noise.uniform_rows(seed, first_row, rows, classes,
                                     minval=_TINY, maxval=1.0)
    gumbel = -tf.math.log(-tf.math.log(uniform))
    label_ids = tf.argmax(tf.cast(teacher_logits, tf.float32) + gumbel,
                          axis=-1, output_type=tf.int32)
  else:
    label_ids = tf.argmax(teacher_logits, axis=-1, output_type=tf.int32)
  if mode == 'soft':
    target_probs = tf.nn.softmax(teacher_logits)
  else:
    target_probs = one_hot(label_ids, teacher_logits)
  return target_probs, label_ids


def uda_consistency(teacher_logits_ori: tf.Tensor,
                    teacher_logits_aug: tf.Tensor, temperature: float,
                    threshold: float, global_count: int):
  """The UDA loss of the teacher, as the released code computes it.

  The target is the sharpened, stop-gradient teacher distribution on the
  original view, softmax(logits_ori / temperature); only examples whose
  *sharpened* top probability reaches `threshold` count, but masked examples
  still count in the denominator (the global unlabeled batch).

  Returns:
    (loss, fraction of the local examples that passed the threshold).
  """
  target = tf.stop_gradient(tf.nn.softmax(teacher_logits_ori / temperature))
  mask = tf.cast(tf.reduce_max(target, axis=-1) >= threshold,
                 teacher_logits_aug.dtype)
  per_example = cross_entropy_per_example(target, teacher_logits_aug)
  loss = tf.reduce_sum(per_example * mask) / tf.cast(
      global_count, teacher_logits_aug.dtype)
  return loss, tf.reduce_mean(mask)


def uda_weight(step: tf.Tensor, weight: float, ramp_steps: int) -> tf.Tensor:
  """weight * min(1, step / ramp_steps): the released code's linear ramp."""
  fraction = tf.cast(step, tf.float32) / float(ramp_steps)
  return weight * tf.minimum(1.0, fraction)
