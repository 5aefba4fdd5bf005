"""Float32 error of synchronized batch norm's variance, and what a fix costs.

Usage (from the repository root; a few seconds on one CPU core):
  .venv/bin/python benchmarks/sync_bn_variance.py [--replicas=8] [--json=PATH]

Synchronized batch norm (Keras's `_compute_moments_sync`, the released
code's `modeling_utils.sync_batch_norm` on TPU) sums x and x^2 on each
replica, all-reduces both sums and takes var = E[x^2] - E[x]^2. In float32
that subtraction cancels when |mean| >> std: its absolute error is about
eps_32 * E[x^2], so its relative error grows like (mean / std)^2. Two
alternatives are measured against a float64 reference on the same values:

  one_pass   E[x^2] - E[x]^2 over the replicas' sums (Keras and released)
  two_pass   the global mean first (one all-reduce), then the centred
             second moment sum (x - mean)^2 (a second all-reduce that can
             only start when the first has ended)
  shifted    the one-pass formula on x - K, with K a per-channel shift
             every replica knows (here: another batch's mean, standing in
             for the moving mean once it tracks the batch mean); no extra
             all-reduce, exact whatever K is, as precise as two_pass when
             K is near the mean (and as one_pass when K is 0, as the moving
             mean is at the start of training)

Activations are per replica [b, h, w, C] normal draws with per-channel
means mean/std times a U(0.5, 1.5) factor, std 1 (the relative error does not
depend on the scale), for mean/std from 0 to 100; and, for a measured
scale, the inputs of every batch-norm layer of a freshly built WRN-28-2 on
unit-normal images (its |mean| / std per channel, reported as quantiles).

The cost side is counted, not timed (no TPU here): per batch-norm layer and
forward pass, each all-reduce carries C float32 values (4 C bytes). Keras
issues three (sum, sum of squares, count), the released code two; two_pass
sends the same bytes (sum, centred sum, count) but in two rounds in series
instead of one, i.e. one more all-reduce latency per layer in the forward
pass and one more in the backward pass (the gradient of an all-reduce is an
all-reduce). The counts per network come from the built networks'
batch-norm layers (without weights). docs/models.md records the output.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top
import keras
import numpy as np
import tensorflow as tf

from mpl_tf.config import ModelConfig
from mpl_tf.models import build_model, without_weights
# pylint: enable=g-import-not-at-top

RATIOS = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0)
FORMULAS = ('one_pass', 'two_pass', 'shifted')
NETWORKS = ('wrn-28-2', 'wrn-28-10', 'resnet-50', 'efficientnet-b0')


def _replica_sums(per_replica, fn):
  """The all-reduce SUM over replicas of each replica's per-channel sum."""
  return tf.add_n([tf.reduce_sum(fn(x), axis=[0, 1, 2]) for x in per_replica])


def moments(per_replica, formula: str, shift):
  """(mean, variance) over the replicas' batches, by `formula`."""
  count = tf.cast(sum(int(np.prod(x.shape[:3])) for x in per_replica),
                  per_replica[0].dtype)
  if formula == 'shifted':
    shift = tf.cast(shift, per_replica[0].dtype)
    moved = moments([x - shift for x in per_replica], 'one_pass', None)
    return moved[0] + shift, moved[1]
  mean = _replica_sums(per_replica, lambda x: x) / count
  if formula == 'one_pass':
    return mean, tf.maximum(
        _replica_sums(per_replica, tf.square) / count - tf.square(mean), 0.0)
  if formula == 'two_pass':
    return mean, _replica_sums(per_replica,
                               lambda x: tf.square(x - mean)) / count
  raise ValueError(formula)


def variance_and_gradient(per_replica, formula, shift, weights, dtype):
  """The variance, and the gradient of sum(weights * normalised x) by x."""
  per_replica = [tf.constant(x, dtype) for x in per_replica]
  with tf.GradientTape() as tape:
    tape.watch(per_replica)
    mean, variance = moments(per_replica, formula, shift)
    loss = tf.add_n([
        tf.reduce_sum(tf.constant(w, dtype) * (x - mean) *
                      tf.math.rsqrt(variance + 1e-3))
        for x, w in zip(per_replica, weights)])
  gradient = tape.gradient(loss, per_replica)
  return variance.numpy(), np.concatenate([g.numpy() for g in gradient])


def errors(per_replica, shift, weights):
  """Per formula, the float32 result's error against float64 on the same
  float32 inputs: variance (max relative over channels) and gradient (max
  absolute over the largest)."""
  inputs = [x.astype(np.float32) for x in per_replica]
  variance64, gradient64 = variance_and_gradient(
      inputs, 'two_pass', shift, weights, tf.float64)
  results = {}
  for formula in FORMULAS:
    variance, gradient = variance_and_gradient(inputs, formula, shift,
                                               weights, tf.float32)
    results[formula] = dict(
        variance=float(np.max(np.abs(variance - variance64) / variance64)),
        gradient=float(np.max(np.abs(gradient - gradient64)) /
                       np.max(np.abs(gradient64))))
  return results


def sweep(replicas: int, batch: int, size: int, channels: int, seed: int):
  """Errors for each mean/std ratio of RATIOS."""
  rng = np.random.default_rng(seed)
  rows = []
  for ratio in RATIOS:
    means = ratio * rng.uniform(0.5, 1.5, size=channels)
    draw = lambda: [rng.normal(means, 1.0, size=(batch, size, size, channels))
                    for _ in range(replicas)]
    per_replica = draw()
    # The shift: another batch's mean, as a moving mean that tracks it.
    shift = np.concatenate(draw()).astype(np.float32).mean(axis=(0, 1, 2))
    weights = [rng.normal(size=x.shape) for x in per_replica]
    rows.append(dict(mean_over_std=ratio,
                     **errors(per_replica, shift, weights)))
  return rows


def batch_norm_layers(name: str):
  """(layer name, channels) of every batch-norm layer of a network."""
  with without_weights():
    model = build_model(ModelConfig(name=name), 10, 32, 'count')
    return [(layer.name, int(layer.moving_mean.shape[0]))
            for layer in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
            if isinstance(layer, keras.layers.BatchNormalization)]


def wrn_input_ratios(seed: int, batch: int):
  """|mean| / std per channel of the inputs of WRN-28-2's batch norms.

  A freshly built network on unit-normal 32x32 images: the scale of the
  activations at the start of training (the issue's step 2), in quantiles.
  """
  keras.utils.set_random_seed(seed)
  model = build_model(ModelConfig(name='wrn-28-2'), 10, 32, 'probe')
  layers = [layer for layer in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
            if isinstance(layer, keras.layers.BatchNormalization)]
  probe = keras.Model(model.inputs, [layer.input for layer in layers])
  images = np.random.default_rng(seed).normal(size=(batch, 32, 32, 3))
  ratios = []
  for value in probe([images.astype(np.float32)], training=False):
    value = np.asarray(value, np.float64)
    mean = value.mean(axis=(0, 1, 2))
    std = value.std(axis=(0, 1, 2))
    ratios.append(np.abs(mean) / np.maximum(std, 1e-12))
  ratios = np.concatenate(ratios)
  return {q: float(np.quantile(ratios, q)) for q in (0.5, 0.9, 0.99, 1.0)}


def all_reduce_costs(name: str):
  """Counted all-reduce traffic of a network's synchronized batch norms."""
  layers = batch_norm_layers(name)
  channels = [c for _, c in layers]
  return dict(network=name, batch_norm_layers=len(layers),
              bytes_per_all_reduce_min=4 * min(channels),
              bytes_per_all_reduce_max=4 * max(channels),
              bytes_per_forward_keras=3 * 4 * sum(channels),
              bytes_per_forward_two_pass=3 * 4 * sum(channels),
              serial_rounds_per_forward_keras=len(layers),
              serial_rounds_per_forward_two_pass=2 * len(layers))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--replicas', type=int, default=8)
  parser.add_argument('--per_replica_batch', type=int, default=16)
  parser.add_argument('--size', type=int, default=8,
                      help='Spatial side (8: WRN-28-k\'s last stage).')
  parser.add_argument('--channels', type=int, default=128)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default='', help='Also write the results.')
  args = parser.parse_args(argv)
  results = dict(
      setting=vars(args),
      sweep=sweep(args.replicas, args.per_replica_batch, args.size,
                  args.channels, args.seed),
      wrn_28_2_input_mean_over_std=wrn_input_ratios(args.seed, 16),
      costs=[all_reduce_costs(name) for name in NETWORKS])
  print(f'{args.replicas} replicas x [{args.per_replica_batch}, {args.size}, '
        f'{args.size}, {args.channels}] float32 activations, std 1; error '
        f'against float64 of the variance (max relative over channels) and '
        f'of the gradient of sum(w * normalised x) by x (max abs / max):')
  print(f'{"mean/std":>9}' + ''.join(f' {f + " var":>15} {"grad":>9}'
                                     for f in FORMULAS))
  for row in results['sweep']:
    print(f'{row["mean_over_std"]:>9g}' + ''.join(
        f' {row[f]["variance"]:>15.2e} {row[f]["gradient"]:>9.2e}'
        for f in FORMULAS))
  quantiles = results['wrn_28_2_input_mean_over_std']
  print('WRN-28-2 at initialisation, |mean|/std of its batch norms\' inputs '
        '(per channel): ' + ', '.join(f'q{q:g} {v:.3g}'
                                      for q, v in quantiles.items()))
  print('All-reduce traffic of synchronized batch norm per forward pass '
        '(float32; the backward pass all-reduces the gradients of the two '
        'sums, in one round or, two-pass, in two):')
  for row in results['costs']:
    print(f'  {row["network"]}: {row["batch_norm_layers"]} BN layers, '
          f'{row["bytes_per_all_reduce_min"]}-'
          f'{row["bytes_per_all_reduce_max"]} bytes per all-reduce, '
          f'{row["bytes_per_forward_keras"]} bytes either way; rounds in '
          f'series {row["serial_rounds_per_forward_keras"]} (one-pass) vs '
          f'{row["serial_rounds_per_forward_two_pass"]} (two-pass)')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == '__main__':
  main()
