"""Tiny float64 networks, and a functional twin of them for recomputation.

The Keras MLP is what the library trains; `mlp_apply` computes the same
function from a plain list of weight tensors, so tests can unroll updates and
differentiate through them without touching the library.
"""

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf


def keras_mlp(input_dim: int, hidden: int, num_classes: int, seed: int,
              name: str) -> keras.Model:
  """x -> tanh(x W1 + b1) W2 + b2, in float64, with random biases."""
  init = lambda s: keras.initializers.RandomNormal(stddev=0.7, seed=s)
  inputs = keras.Input((input_dim,), dtype='float64')
  x = keras.layers.Dense(hidden, activation='tanh', dtype='float64',
                         kernel_initializer=init(seed),
                         bias_initializer=init(seed + 1))(inputs)
  logits = keras.layers.Dense(num_classes, dtype='float64',
                              kernel_initializer=init(seed + 2),
                              bias_initializer=init(seed + 3))(x)
  return keras.Model(inputs, logits, name=name)


def mlp_apply(weights: Sequence[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
  kernel1, bias1, kernel2, bias2 = weights
  return tf.matmul(tf.tanh(tf.matmul(x, kernel1) + bias1), kernel2) + bias2


def snapshot(model: keras.Model):
  """Copies of the trainable weights as float64 tensors, in model order."""
  return [tf.constant(np.array(v.numpy(), dtype=np.float64))
          for v in model.trainable_variables]


def random_batch(seed: int, num_labeled: int, num_unlabeled: int,
                 input_dim: int, num_classes: int):
  rng = np.random.default_rng(seed)
  return {
      'labeled_images': tf.constant(rng.normal(size=(num_labeled, input_dim))),
      'labels': tf.constant(rng.integers(0, num_classes, num_labeled),
                            dtype=tf.int32),
      'unlabeled_images_ori': tf.constant(
          rng.normal(size=(num_unlabeled, input_dim))),
      'unlabeled_images_aug': tf.constant(
          rng.normal(size=(num_unlabeled, input_dim))),
  }
