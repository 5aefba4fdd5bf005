"""What fits where: the MPL step's memory per image, measured small, scaled.

  .venv/bin/python benchmarks/activation_memory.py            # measure + table
  .venv/bin/python benchmarks/activation_memory.py --table_only  # from JSON
  .venv/bin/python benchmarks/activation_memory.py --points=wrn   # one group

Method (docs/compute.md, "What fits where", says it in full):

1. Measure: one MPL step (exact h, the product's device loop as
   benchmarks/step_benchmark.py builds it) per fresh child process, on CPU,
   at small per-replica batches B (B*mu unlabeled per view), K=1 or K=2
   chunks; TensorFlow's allocator peak (`get_memory_info('CPU:0')`, reset
   after the build) and the process's peak RSS, after two steps.
2. Fit: peak = fixed + per_labeled_image * B/K, per network, image size,
   precision and K mode (K=1 keeps the teacher's taped pass alive while the
   student runs; K>1 rematerializes the teacher per chunk, a different
   program).
3. Scale: bytes per labeled image are proportional to the network's
   activation elements per image (every layer's output elements, counted
   from shapes with `mpl_tf.models.without_weights()`, as flops.py counts
   FLOPs); EfficientNet-B6-Wide and L2 take EfficientNet-B0's bytes per
   element (same blocks; above 64 px so the stem strides as at 512 px).
   Checked by predicting each network at a second image size.
4. Fits where: static (bytes per parameter, from ResNet-50's fixed term;
   +4 under mixed precision for the 16-bit weight copies) plus one chunk's
   activations (16 bits: the family's measured ratio) against a device's
   memory less a margin: the smallest K dividing the per-replica batch.

Writes benchmarks/activation_memory.json (every point, every fit, the
scaled numbers and the table's inputs) and prints the markdown tables.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(REPO, 'benchmarks', 'activation_memory.json')
GB = 2 ** 30  # GB here and in docs/compute.md's table: 2^30 bytes.

# Measured points: (group, model, image size, mu, labeled batch B, K,
# precision). mu is the preset's whose network it stands for; each point is
# at most a few GB.
POINTS = (
    ('wrn', 'wrn-28-2', 32, 7, 8, 1, 'float32'),
    ('wrn', 'wrn-28-2', 32, 7, 16, 1, 'float32'),
    ('wrn', 'wrn-28-2', 32, 7, 16, 2, 'float32'),
    ('wrn', 'wrn-28-2', 32, 7, 32, 2, 'float32'),
    ('wrn_bf16', 'wrn-28-2', 32, 7, 8, 1, 'mixed_bfloat16'),
    ('wrn_bf16', 'wrn-28-2', 32, 7, 16, 1, 'mixed_bfloat16'),
    ('resnet', 'resnet-50', 96, 15, 1, 1, 'float32'),
    ('resnet', 'resnet-50', 96, 15, 2, 1, 'float32'),
    ('resnet', 'resnet-50', 96, 15, 2, 2, 'float32'),
    ('resnet', 'resnet-50', 96, 15, 4, 2, 'float32'),
    ('resnet_64', 'resnet-50', 64, 15, 2, 1, 'float32'),
    ('resnet_64', 'resnet-50', 64, 15, 4, 1, 'float32'),
    ('effnet', 'efficientnet-b0', 96, 8, 2, 1, 'float32'),
    ('effnet', 'efficientnet-b0', 96, 8, 4, 1, 'float32'),
    ('effnet', 'efficientnet-b0', 96, 8, 4, 2, 'float32'),
    ('effnet', 'efficientnet-b0', 96, 8, 8, 2, 'float32'),
    ('effnet_128', 'efficientnet-b0', 128, 8, 1, 1, 'float32'),
    ('effnet_128', 'efficientnet-b0', 128, 8, 2, 1, 'float32'),
    ('resnet_bf16', 'resnet-50', 96, 15, 1, 1, 'mixed_bfloat16'),
    ('resnet_bf16', 'resnet-50', 96, 15, 2, 1, 'mixed_bfloat16'),
    ('effnet_bf16', 'efficientnet-b0', 96, 8, 2, 1, 'mixed_bfloat16'),
    ('effnet_bf16', 'efficientnet-b0', 96, 8, 4, 1, 'mixed_bfloat16'),
)
MEASURED_CLASSES = 10


# ---------------------------------------------------------- arithmetic --

def activation_elements(model) -> int:
  """Output elements of one image summed over every layer of `model`.

  Every layer but the inputs, each output counted once, the batch dimension
  left out: what a pass could keep for the backward pass, by shape.
  """
  import keras  # pylint: disable=g-import-not-at-top
  total = 0
  for layer in model.layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    outputs = layer.output
    for output in (outputs if isinstance(outputs, (list, tuple))
                   else [outputs]):
      total += math.prod(int(d) for d in output.shape[1:])
  return total


def network_counts(name: str, num_classes: int, image_size: int) -> dict:
  """{'elements', 'parameters'} of a network, from shapes only."""
  sys.path.insert(0, REPO)
  from mpl_tf.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from mpl_tf import models  # pylint: disable=g-import-not-at-top
  with models.without_weights():
    model = models.build_model(ModelConfig(name=name), num_classes,
                               image_size, 'count')
    parameters = sum(math.prod(v.shape) for v in model.trainable_weights)
    return {'elements': activation_elements(model),
            'parameters': int(parameters)}


def fit_line(xs, ys):
  """Least-squares (intercept, slope) of ys against xs (at least 2 xs)."""
  n = len(xs)
  if n < 2 or len(set(xs)) < 2:
    raise ValueError(f'a line needs two distinct x, got {xs}')
  mean_x, mean_y = sum(xs) / n, sum(ys) / n
  slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) /
           sum((x - mean_x) ** 2 for x in xs))
  return mean_y - slope * mean_x, slope


def replica_bytes(costs: dict, batch: int, k: int) -> float:
  """Bytes of one replica with labeled batch `batch` in k chunks.

  costs: {'k1': (fixed, per labeled image), 'chunk': (fixed, per labeled
  image of a chunk)}: K=1 and K>1 are different programs (module doc).
  """
  fixed, per_image = costs['k1' if k == 1 else 'chunk']
  return fixed + per_image * batch / k


def smallest_k(costs: dict, batch: int, capacity: float, margin: float):
  """The smallest K dividing `batch` with replica_bytes <= (1 - margin) *
  capacity, or None if not even one labeled image per chunk fits."""
  for k in range(1, batch + 1):
    if batch % k == 0 and replica_bytes(costs, batch, k) <= (
        1.0 - margin) * capacity:
      return k
  return None


# ------------------------------------------------------------ the table --

# (preset, network, classes, image, labeled batch B, mu, precision, the
# measured group whose bytes per counted element it takes, replica counts).
# Replica counts: the cifar/svhn command runs on one device as written, and
# docs/compute.md projects a v3-8 (8 cores); ImageNet-10% names "a TPU":
# a v3-8 board, or the v3-32 compute.md suggests; the JFT presets name "a
# pod slice" of no size: 1,024 cores (docs/training.md's example) and 2,048
# (a whole v3 pod).
PRESETS = (
    ('cifar10_4k, svhn_1k', 'wrn-28-2', 10, 32, 128, 7, 'float32', 'wrn',
     (1, 8)),
    ('cifar10_4k, svhn_1k + mixed', 'wrn-28-2', 10, 32, 128, 7,
     'mixed_bfloat16', 'wrn', (1, 8)),
    ('imagenet_10pct', 'resnet-50', 1000, 224, 1024, 15, 'mixed_bfloat16',
     'resnet', (8, 32)),
    ('imagenet_b6_wide', 'efficientnet-b6-mpl', 1000, 512, 4096, 8,
     'mixed_bfloat16', 'effnet', (1024, 2048)),
    ('imagenet_l2', 'efficientnet-l2', 1000, 512, 4096, 8, 'mixed_bfloat16',
     'effnet', (1024, 2048)),
)
# Memory of one replica, GB (2^30 bytes): a GPU; a TPU v3 core (16 GB of
# its chip's 32) and a v5e chip (one core); a TPU v4 chip (32 GB, its two
# TensorCores one device, so one replica, to TensorFlow).
DEVICES = (('16 GB: GPU, TPU v3 core, v5e chip', 16),
           ('24 GB GPU', 24), ('32 GB: TPU v4 chip', 32),
           ('40 GB GPU', 40), ('80 GB GPU', 80))
# Reserved for the runtime, allocator fragmentation, cuDNN / XLA workspaces
# and the input pipeline's buffers (assumed).
MARGIN = 0.20
# 16-bit activations (mixed_bfloat16, mixed_float16): the family's measured
# ratio of its mixed_bfloat16 to its float32 K=1 slope (the <group>_bf16
# points; Keras keeps batch norm's arithmetic, so some saved tensors, in
# float32), applied to K=1 and chunks alike; this if not measured (assumed).
HALF_PRECISION_FACTOR = 0.5
# Under a mixed policy the variables stay float32 and each pass casts the
# teacher's and the student's to 16 bits: 2 bytes each (assumed).
MIXED_EXTRA_BYTES_PER_PARAMETER = 4
# mixed_float16 also copies the state its loss scaling may undo (weights of
# three networks and two optimizers' slots: docs/models.md, "Cost"): 5 x 4
# bytes per parameter more than bfloat16.
FLOAT16_EXTRA_BYTES_PER_PARAMETER = 20


def fits(points) -> dict:
  """{group/k1|chunk: line fits of the TF peak and RSS against c = B/K}."""
  out = {}
  for group in sorted({p['group'] for p in points}):
    for mode in ('k1', 'chunk'):
      mine = [p for p in points if p['group'] == group and
              (p['k'] == 1) == (mode == 'k1')]
      if len(mine) < 2:
        continue
      chunk = [p['batch'] / p['k'] for p in mine]
      tf_fixed, tf_slope = fit_line(chunk, [p['tf_peak_bytes'] for p in mine])
      rss_fixed, rss_slope = fit_line(chunk,
                                      [p['rss_peak_bytes'] for p in mine])
      first = mine[0]
      counts = network_counts(first['model'], MEASURED_CLASSES,
                              first['image_size'])
      mu = first['mu']
      # Images whose activations the fit's peak holds, per labeled image:
      # teacher and student passes (k1), one teacher pass (chunk).
      pass_images = (1 + 2 * mu) + (mu + 1) if mode == 'k1' else 1 + 2 * mu
      out[f'{group}/{mode}'] = dict(
          model=first['model'], image_size=first['image_size'], mu=mu,
          precision=first['precision'], points=len(mine),
          fixed_bytes=tf_fixed, per_labeled_image_bytes=tf_slope,
          rss_fixed_bytes=rss_fixed, rss_per_labeled_image_bytes=rss_slope,
          elements=counts['elements'], parameters=counts['parameters'],
          bytes_per_element=tf_slope / counts['elements'],
          bytes_per_element_per_pass_image=(
              tf_slope / counts['elements'] / pass_images))
  return out


def analyse(points) -> dict:
  """The fits, their checks, the presets' scaled numbers and the table."""
  line = fits(points)
  checks = {}
  for small, other in (('resnet', 'resnet_64'), ('effnet', 'effnet_128')):
    if f'{small}/k1' in line and f'{other}/k1' in line:
      a, b = line[f'{small}/k1'], line[f'{other}/k1']
      predicted = a['per_labeled_image_bytes'] * b['elements'] / a['elements']
      checks[f'{other}/k1 from {small}/k1'] = dict(
          predicted_bytes=predicted, measured_bytes=b[
              'per_labeled_image_bytes'],
          error=predicted / b['per_labeled_image_bytes'] - 1)
  half_ratio = {}
  for group in ('wrn', 'resnet', 'effnet'):
    if f'{group}_bf16/k1' in line and f'{group}/k1' in line:
      half_ratio[group] = (line[f'{group}_bf16/k1']['per_labeled_image_bytes']
                           / line[f'{group}/k1']['per_labeled_image_bytes'])
  # Bytes per parameter of everything that does not grow with the batch:
  # the fixed term of the network with the most parameters (ResNet-50), the
  # larger of its K=1 and chunk fits, for both.
  per_parameter = max(line[f'resnet/{mode}']['fixed_bytes'] /
                      line[f'resnet/{mode}']['parameters']
                      for mode in ('k1', 'chunk'))
  rows = []
  for (preset, model, classes, size, batch, mu, precision, group,
       replica_counts) in PRESETS:
    if f'{group}/k1' not in line or f'{group}/chunk' not in line:
      continue
    counts = network_counts(model, classes, size)
    half = precision != 'float32'
    scale = half_ratio.get(group, HALF_PRECISION_FACTOR) if half else 1.0
    per_image = {mode: line[f'{group}/{mode}']['bytes_per_element'] *
                 counts['elements'] * scale for mode in ('k1', 'chunk')}
    static = counts['parameters'] * (
        per_parameter + (MIXED_EXTRA_BYTES_PER_PARAMETER if half else 0))
    for replicas in replica_counts:
      b = batch // replicas
      row = dict(preset=preset, model=model, image_size=size, batch=batch,
                 mu=mu, precision=precision, replicas=replicas,
                 per_replica_batch=b, parameters=counts['parameters'],
                 elements=counts['elements'],
                 per_labeled_image_k1_bytes=per_image['k1'],
                 per_labeled_image_chunk_bytes=per_image['chunk'],
                 activation_scale=scale, static_bytes=static,
                 k1_bytes=static + per_image['k1'] * b,
                 smallest_chunk_bytes=static + per_image['chunk'],
                 smallest_k={})
      costs = {mode: (static, per_image[mode])
               for mode in ('k1', 'chunk')}
      # Two variants where they change K: mixed_float16's undo copy, and
      # 16-bit activations at exactly half float32's bytes (assumed).
      variants = {
          'float16': {mode: (fixed + FLOAT16_EXTRA_BYTES_PER_PARAMETER *
                             counts['parameters'], per)
                      for mode, (fixed, per) in costs.items()},
          'half': {mode: (fixed, per / scale * HALF_PRECISION_FACTOR)
                   for mode, (fixed, per) in costs.items()}} if half else {}
      row['smallest_k_variants'] = {name: {} for name in variants}
      for label, capacity in DEVICES:
        row['smallest_k'][label] = smallest_k(costs, b, capacity * GB,
                                              MARGIN)
        for name, variant in variants.items():
          row['smallest_k_variants'][name][label] = smallest_k(
              variant, b, capacity * GB, MARGIN)
      rows.append(row)
  return dict(fits=line, checks=checks, bytes_per_parameter=per_parameter,
              half_precision_ratio=half_ratio, margin=MARGIN,
              mixed_extra_bytes_per_parameter=MIXED_EXTRA_BYTES_PER_PARAMETER,
              float16_extra_bytes_per_parameter=(
                  FLOAT16_EXTRA_BYTES_PER_PARAMETER),
              devices=DEVICES, rows=rows)


def print_tables(analysis: dict) -> None:
  print('\n| group/mode | network | image | mu | precision | points | fixed '
        'GB | GB per labeled image | RSS: fixed, per labeled | counted '
        'elements / image | bytes per element | per element and pass image |')
  print('|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|')
  for key, f in analysis['fits'].items():
    print(f'| {key} | {f["model"]} | {f["image_size"]} | {f["mu"]} | '
          f'{f["precision"]} | {f["points"]} | {f["fixed_bytes"] / GB:.3f} | '
          f'{f["per_labeled_image_bytes"] / GB:.4f} | '
          f'{f["rss_fixed_bytes"] / GB:.2f}, '
          f'{f["rss_per_labeled_image_bytes"] / GB:.4f} | '
          f'{f["elements"]:,} | {f["bytes_per_element"]:.1f} | '
          f'{f["bytes_per_element_per_pass_image"]:.2f} |')
  for name, check in analysis['checks'].items():
    print(f'check {name}: ' + ', '.join(
        f'{k} {v / GB:.4f} GB' if k.endswith('bytes') else f'{k} {v:+.3f}'
        for k, v in check.items()))
  print(f'bytes per parameter (fixed / parameters, ResNet-50): '
        f'{analysis["bytes_per_parameter"]:.1f}; 16-bit / float32 activations '
        f'(CPU): ' + ', '.join(f'{k} {v:.3f}' for k, v in
                               analysis['half_precision_ratio'].items()))
  labels = [label for label, _ in analysis['devices']]
  print('\n| preset | precision | replicas | per-replica b (+ b*mu) | '
        'static GB | GB per labeled image, K=1 / chunk | K=1 GB | one-image '
        'chunk GB | ' + ' | '.join(labels) + ' |')
  print('|---|---|---:|---:|---:|---:|---:|---:|' + '---:|' * len(labels))
  for r in analysis['rows']:
    show = lambda k: 'no' if k is None else str(k)
    ks = []
    for l in labels:
      other = [f'{name}: {show(k[l])}' for name, k in
               r['smallest_k_variants'].items() if k[l] != r['smallest_k'][l]]
      ks.append(show(r['smallest_k'][l]) +
                (f' ({"; ".join(other)})' if other else ''))
    print(f'| {r["preset"]} | {r["precision"]} | {r["replicas"]:,} | '
          f'{r["per_replica_batch"]:,} (+{r["per_replica_batch"] * r["mu"]:,})'
          f' | {r["static_bytes"] / GB:.2f} | '
          f'{r["per_labeled_image_k1_bytes"] / GB:.3g} / '
          f'{r["per_labeled_image_chunk_bytes"] / GB:.3g} | '
          f'{r["k1_bytes"] / GB:,.1f} | {r["smallest_chunk_bytes"] / GB:,.1f}'
          f' | ' + ' | '.join(ks) + ' |')


# -------------------------------------------------------------- worker --

def run_point(point: dict) -> dict:
  """One MPL step's memory in this (fresh) process."""
  from mpl_tf import malloc_tuning  # pylint: disable=g-import-not-at-top
  malloc_tuning.tune()  # As main.py: RSS then tracks the heap's peak.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  from step_benchmark import _build_loop  # pylint: disable=g-import-not-at-top
  case = {'step': 'mpl_exact', 'batch': point['batch'], 'mu': point['mu'],
          'precision': point['precision'], 'xla': False,
          'microbatches': point['k'], 'model': point['model'],
          'image_size': point['image_size']}
  start = time.perf_counter()
  loop, iterator, _ = _build_loop(case)
  built = tf.config.experimental.get_memory_info('CPU:0')['current']
  rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  tf.config.experimental.reset_memory_stats('CPU:0')
  for _ in range(2):
    loop(iterator, tf.constant(1))['health/nonfinite'].numpy()
  info = tf.config.experimental.get_memory_info('CPU:0')
  return dict(point, tf_bytes_after_build=built, tf_peak_bytes=info['peak'],
              rss_after_build_bytes=rss_built,
              rss_peak_bytes=resource.getrusage(
                  resource.RUSAGE_SELF).ru_maxrss * 1024,
              seconds=time.perf_counter() - start)


# -------------------------------------------------------------- parent --

def measure(points) -> list:
  results = []
  for group, model, size, mu, batch, k, precision in points:
    point = dict(group=group, model=model, image_size=size, mu=mu,
                 batch=batch, k=k, precision=precision)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=REPO,
               CUDA_VISIBLE_DEVICES='')
    process = subprocess.run(
        [sys.executable, os.path.abspath(__file__), '--worker',
         json.dumps(point)], cwd=REPO, env=env, capture_output=True,
        text=True)
    if process.returncode:
      sys.stderr.write(process.stderr[-3000:])
      raise SystemExit(f'point {point} failed (exit {process.returncode}).')
    results.append(json.loads(process.stdout.strip().splitlines()[-1]))
    r = results[-1]
    print(f'{group:10s} {model:16s} {size:4d}px mu={mu:2d} B={batch:2d} '
          f'K={k} {precision:15s} TF peak {r["tf_peak_bytes"] / GB:6.3f} GB '
          f'(after build {r["tf_bytes_after_build"] / GB:.3f}), RSS peak '
          f'{r["rss_peak_bytes"] / GB:6.3f} GB, {r["seconds"]:.0f} s',
          flush=True)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--points', default='',
                      help='Comma-separated groups to measure (default all).')
  parser.add_argument('--table_only', action='store_true',
                      help='Recompute the tables from the JSON\'s points.')
  parser.add_argument('--output', default=OUTPUT)
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(run_point(json.loads(args.worker))))
    return
  groups = set(args.points.split(',')) if args.points else None
  previous, previous_commands = [], []
  if os.path.exists(args.output):
    with open(args.output) as f:
      stored = json.load(f)
    previous = stored.get('points', [])
    # The runs that measured the points kept (a group's new run replaces
    # that group's points).
    previous_commands = stored.get('commands', [])
  if args.table_only:
    if not previous:
      raise SystemExit(f'--table_only: no measured points in {args.output}; '
                       f'measure them first (no --table_only).')
    results = previous
  else:
    todo = [p for p in POINTS if groups is None or p[0] in groups]
    results = [r for r in previous if groups is not None and
               r['group'] not in groups] + measure(todo)
    if groups is None:
      previous_commands = []
  analysis = analyse(results)
  print_tables(analysis)
  commands = previous_commands + ([] if args.table_only else [' '.join(
      ['benchmarks/activation_memory.py', *sys.argv[1:]])])
  with open(args.output, 'w') as f:
    json.dump({'commands': commands, 'points': results,
               'analysis': analysis}, f, indent=2, sort_keys=True)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
