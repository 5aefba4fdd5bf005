"""Batch norm on TensorFlow's fused kernel, with Keras 3's semantics.

Keras 3's `BatchNormalization` computes the moments (`tf.nn.moments`) and
the normalisation (`tf.nn.batch_normalization`) as separate element-wise
ops, so TensorFlow's `FusedBatchNormV3`, and with it oneDNN's (CPU) and
cuDNN's (GPU) fused kernels and Grappler's fusions around them, never runs:
every batch norm reads and writes its activations several times, forward
and backward (docs/performance.md). `FusedBatchNormalization` is the same
layer with `call` on `tf.raw_ops.FusedBatchNormV3` wherever that op computes
what Keras's layer computes, and Keras's own `call` everywhere else.

Being a subclass keeps everything that selects batch norm by object working
(`batch_norm_statistics`, the weight-decay exemption of
`normalization_weights`, microbatches.py, the EMA's pairing), keeps the
variables (gamma, beta, moving_mean, moving_variance, float32, same names),
so checkpoints written with Keras's layer load into this one and back, and
keeps the config (the class is registered, so `from_config` round trips).

Semantics, equal to Keras's layer (tests/test_fused_batch_norm.py):
  * training (`training=True` and `trainable`): normalise with the batch's
    mean and *biased* variance; moving = moving * momentum + batch * (1 -
    momentum), assigned to the same variables as Keras does (so passes that
    restore them, `restored_afterwards`, work unchanged). The op returns the
    Bessel-corrected variance n/(n-1) var for its running average (TF 1's
    convention); it is scaled back by (n-1)/n, so the moving variance is
    Keras's (biased) one, not TF 1's.
  * inference: normalise with the moving statistics.
  * epsilon exactly as configured (the raw op, not `tf.nn.fused_batch_norm`,
    which raises epsilon to 1.001e-5; below that cuDNN refuses, so such a
    layer uses Keras's path).
  * mixed precision: x and y in the compute dtype (bfloat16, float16), the
    statistics, gamma and beta in float32, the arithmetic in float32 inside
    the kernel (Keras casts x to float32 around the same arithmetic).
Keras's path is used for synchronized batch norm over more than one replica
(the cross-replica sums of x and x^2 are Keras's; over one replica, or
outside any strategy, there is nothing to sum with and the local batch is
the global one), for inputs that are not 4-D channels-last, for float64, for
renorm and for epsilon below 1.001e-5. Masks are refused: no network here
makes one, and the fused op cannot weight positions.
"""

import keras
import tensorflow as tf

# cuDNN's smallest epsilon (CUDNN_BN_MIN_EPSILON is 1e-5, and TF keeps a
# margin); FusedBatchNormV3 on GPU fails below it.
MIN_FUSED_EPSILON = 1.001e-5
_FUSED_DTYPES = ('float32', 'bfloat16', 'float16')


@keras.saving.register_keras_serializable(package='mpl_tf')
class FusedBatchNormalization(keras.layers.BatchNormalization):
  """keras.layers.BatchNormalization computed by FusedBatchNormV3 (see module)."""

  def call(self, inputs, training=None, mask=None):
    if mask is not None:
      raise ValueError(
          f'Batch-norm layer {self.name!r} got a mask, which the fused '
          f'kernel cannot weight; build the network with '
          f'--batch_norm_kernel=keras (ModelConfig.batch_norm_kernel).')
    if not self.fusable(inputs):
      return super().call(inputs, training=training)
    training = bool(training and self.trainable)
    channels = inputs.shape[-1]
    scale = (tf.cast(self.gamma, tf.float32) if self.scale
             else tf.ones([channels], tf.float32))
    offset = (tf.cast(self.beta, tf.float32) if self.center
              else tf.zeros([channels], tf.float32))
    moving_mean = tf.cast(self.moving_mean, tf.float32)
    moving_variance = tf.cast(self.moving_variance, tf.float32)
    if not training:
      return tf.raw_ops.FusedBatchNormV3(
          x=inputs, scale=scale, offset=offset, mean=moving_mean,
          variance=moving_variance, epsilon=self.epsilon,
          exponential_avg_factor=1.0, data_format='NHWC',
          is_training=False).y
    empty = tf.constant([], tf.float32)
    fused = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=scale, offset=offset, mean=empty, variance=empty,
        epsilon=self.epsilon, exponential_avg_factor=1.0, data_format='NHWC',
        is_training=True)
    # The op's batch_variance is the Bessel-corrected n/(n-1) var (its
    # kernels divide by max(n-1, 1)); Keras averages the biased var.
    count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
    variance = fused.batch_variance * (tf.maximum(count - 1.0, 1.0) / count)
    self.moving_mean.assign(
        moving_mean * self.momentum + fused.batch_mean * (1.0 - self.momentum))
    self.moving_variance.assign(
        moving_variance * self.momentum + variance * (1.0 - self.momentum))
    return fused.y

  def fusable(self, inputs) -> bool:
    """Whether FusedBatchNormV3 computes what Keras's `call` would."""
    rank = len(inputs.shape)
    return (rank == 4 and self.axis in (-1, rank - 1) and not self.renorm and
            self.epsilon >= MIN_FUSED_EPSILON and
            keras.backend.standardize_dtype(inputs.dtype) ==
            self.compute_dtype and
            self.compute_dtype in _FUSED_DTYPES and
            not (self.synchronized and _replicas_in_sync() > 1))


def _replicas_in_sync() -> int:
  """Replicas Keras's synchronized moments would sum over (1: none)."""
  context = tf.distribute.get_replica_context()
  return 1 if context is None else context.num_replicas_in_sync
