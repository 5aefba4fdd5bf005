"""Counts forward FLOPs of each preset's network and projects an MPL run's cost.

Usage (from the repository root):
  .venv/bin/python benchmarks/flops.py [--check_with_profiler]

How FLOPs are counted: analytically, from layer shapes. Each network is built
through `build_model` inside `mpl_tf.models.without_weights()` (shapes only,
no weights, so EfficientNet-L2 at 800 px takes seconds and no memory), and
for every Conv2D, DepthwiseConv2D and Dense layer the multiply-accumulates
of one image are

  conv:      H_out * W_out * k_h * k_w * C_in * C_out   (+ H_out*W_out*C_out
             for a bias)
  depthwise: H_out * W_out * k_h * k_w * C_in
  dense:     C_in * C_out (+ C_out)

Forward FLOPs = 2 x MACs. Batch norm, activations, pooling, the SE gate's
multiply and residual adds are not counted (a few percent of the total).
`--check_with_profiler` also runs TensorFlow's graph FLOP profiler
(`tf.compat.v1.profiler`, `float_operation`) on a concrete function of the
real, allocated network for the small ones (WRN-28-2, ResNet-50), which
counts every op, as a cross-check.

An MPL step (mpl_tf/mpl_step.py, with B labeled images and B*mu unlabeled
per view) runs, per image, forward + backward (backward ~ 2 x forward, so
3 x forward FLOPs) on:
  teacher: B + 2*B*mu images ([x_l; x_u_ori; x_u_aug]);
  student: B*mu + B images ([x_u; x_l]);
  student: B images (the labeled re-evaluation after the update, which the
           exact h differentiates);
so FLOPs/step = 3 * F * (3*B + 3*B*mu), F = forward FLOPs of one image.
EMA and optimizer updates are O(parameters) and neglected.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top
import keras

from mpl_tf.config import ModelConfig
from mpl_tf import models
# pylint: enable=g-import-not-at-top

# (preset, model, classes, image size, B, mu, steps). Sizes and batches are
# the presets' (flags/*.cfg).
PRESETS = (
    ('cifar10_4k', 'wrn-28-2', 10, 32, 128, 7, 300_000),
    ('svhn_1k', 'wrn-28-2', 10, 32, 128, 7, 300_000),
    ('imagenet_10pct', 'resnet-50', 1000, 224, 1024, 15, 700_000),
    ('imagenet_b6_wide', 'efficientnet-b6-mpl', 1000, 512, 4096, 8,
     1_000_000),
    ('imagenet_l2', 'efficientnet-l2', 1000, 512, 4096, 8, 1_000_000),
)

# Peak dense bf16 throughput, from the vendors' data sheets; utilisation is an
# assumption, not a measurement.
TPU_V3_8_PEAK = 420e12     # Cloud TPU v3-8 board (4 chips, 8 cores)
A100_PEAK = 312e12         # one A100, dense bf16 tensor cores
ASSUMED_UTILISATION = 0.40

# Measured here (benchmarks/input_pipeline.json): one MPL step, WRN-28-2 x2,
# exact h, B=64, mu=7, float32, 2 CPU cores.
CPU_STEP_SECONDS_FILE = os.path.join(os.path.dirname(__file__),
                                     'input_pipeline.json')


def forward_macs(model: keras.Model) -> int:
  """Multiply-accumulates of one image through `model`'s conv/dense layers."""
  total = 0
  for layer in model.layers:
    if isinstance(layer, keras.layers.DepthwiseConv2D):
      _, height, width, channels = layer.output.shape
      kernel_h, kernel_w = layer.kernel_size
      total += height * width * kernel_h * kernel_w * channels
      if layer.use_bias:
        total += height * width * channels
    elif isinstance(layer, keras.layers.Conv2D):
      _, height, width, channels_out = layer.output.shape
      channels_in = layer.input.shape[-1]
      kernel_h, kernel_w = layer.kernel_size
      total += (height * width * kernel_h * kernel_w * channels_in *
                channels_out // layer.groups)
      if layer.use_bias:
        total += height * width * channels_out
    elif isinstance(layer, keras.layers.Dense):
      channels_in, channels_out = layer.input.shape[-1], layer.units
      total += channels_in * channels_out + (channels_out if layer.use_bias
                                             else 0)
  return int(total)


def analytic_forward_flops(name: str, num_classes: int, image_size: int
                           ) -> int:
  with models.without_weights():
    model = models.build_model(ModelConfig(name=name), num_classes,
                               image_size, 'flops')
    return 2 * forward_macs(model)


def profiler_forward_flops(name: str, num_classes: int, image_size: int
                           ) -> int:
  """TF's graph profiler on the allocated network (every op counted)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model = models.build_model(ModelConfig(name=name), num_classes, image_size,
                             'flops')
  function = tf.function(lambda x: model(x, training=False))
  concrete = function.get_concrete_function(
      tf.TensorSpec([1, image_size, image_size, 3], tf.float32))
  options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  options['output'] = 'none'
  profile = tf.compat.v1.profiler.profile(concrete.graph, options=options)
  return int(profile.total_float_ops)


def step_flops(forward_flops: float, batch: int, mu: int) -> float:
  """FLOPs of one MPL step: 3 x forward on 3B + 3B*mu images."""
  images = (batch + 2 * batch * mu) + (batch * mu + batch) + batch
  return 3.0 * forward_flops * images


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--check_with_profiler', action='store_true')
  args = parser.parse_args()

  with open(CPU_STEP_SECONDS_FILE) as f:
    measured = json.load(f)
  wrn_flops = analytic_forward_flops('wrn-28-2', 10, 32)
  cpu_step_flops = step_flops(wrn_flops, measured['batch'], measured['mu'])
  cpu_achieved = cpu_step_flops / measured['step_seconds']

  print('## Forward FLOPs per image (analytic, conv + dense layers)\n')
  print('| model | image | GFLOPs (2 x MACs) | seconds |')
  print('|---|---:|---:|---:|')
  rows, forward = [], {}
  for preset, name, num_classes, image_size, batch, mu, steps in PRESETS:
    key = (name, image_size)
    if key not in forward:
      start = time.time()
      forward[key] = analytic_forward_flops(name, num_classes, image_size)
      print(f'| {name} | {image_size} | {forward[key] / 1e9:,.3f} | '
            f'{time.time() - start:.1f} |')
    rows.append((preset, name, image_size, batch, mu, steps, forward[key]))

  if args.check_with_profiler:
    print('\n## Cross-check: tf.compat.v1.profiler, every op\n')
    print('| model | image | profiler GFLOPs | analytic GFLOPs | ratio |')
    print('|---|---:|---:|---:|---:|')
    for name, num_classes, image_size in (('wrn-28-2', 10, 32),
                                          ('resnet-50', 1000, 224)):
      profiled = profiler_forward_flops(name, num_classes, image_size)
      analytic = forward[(name, image_size)]
      print(f'| {name} | {image_size} | {profiled / 1e9:,.3f} | '
            f'{analytic / 1e9:,.3f} | {profiled / analytic:.3f} |')

  tpu = TPU_V3_8_PEAK * ASSUMED_UTILISATION
  gpu = A100_PEAK * ASSUMED_UTILISATION
  print(f'\n## Projected MPL runs (computed; utilisation '
        f'{ASSUMED_UTILISATION:.0%} assumed)\n')
  print(f'CPU here (measured): {measured["step_seconds"]:.2f} s per MPL step '
        f'at B={measured["batch"]}, mu={measured["mu"]}, WRN-28-2 x2 = '
        f'{cpu_step_flops / 1e12:.3f} TFLOP -> {cpu_achieved / 1e9:.1f} '
        f'GFLOP/s achieved.\n')
  print('| preset | model | image | B | mu | images/step | TFLOP/step | '
        'steps | total EFLOP | v3-8 steps/s | v3-8 hours | A100 steps/s | '
        'A100 hours | CPU-here s/step | CPU-here days |')
  print('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
        '---:|---:|')
  for preset, name, image_size, batch, mu, steps, flops in rows:
    per_step = step_flops(flops, batch, mu)
    images = 3 * batch + 3 * batch * mu
    total = per_step * steps
    print(f'| {preset} | {name} | {image_size} | {batch:,} | {mu} | '
          f'{images:,} | {per_step / 1e12:,.2f} | {steps:,} | '
          f'{total / 1e18:,.1f} | {tpu / per_step:,.3g} | '
          f'{total / tpu / 3600:,.0f} | {gpu / per_step:,.3g} | '
          f'{total / gpu / 3600:,.0f} | {per_step / cpu_achieved:,.0f} | '
          f'{total / cpu_achieved / 3600 / 24:,.0f} |')


if __name__ == '__main__':
  main()
