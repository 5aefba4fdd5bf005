"""What fits where: the MPL step's memory per image, measured small, scaled.

  .venv/bin/python benchmarks/activation_memory.py            # measure + table
  .venv/bin/python benchmarks/activation_memory.py --table_only  # from JSON
  .venv/bin/python benchmarks/activation_memory.py --points=wrn   # one group

Method (docs/compute.md, "What fits where"):

1. Measure. Each point is one MPL step (exact h, the product's device loop:
   benchmarks/step_benchmark.py's `_build_loop`) in a fresh child process,
   on CPU, float32 unless stated, 10 classes, at a small per-replica labeled
   batch B (and B*mu unlabeled per view), with --microbatches K (K=1: the
   whole batch at once; K=2: two chunks of B/2 in turn). The child reads
   TensorFlow's own allocator statistics (`tf.config.experimental.
   get_memory_info('CPU:0')`: the peak of bytes held by tensors, reset
   after the networks are built) and the process's peak RSS (getrusage),
   after two steps.
2. Fit. For one network, image size, precision and K mode, the peak is a
   line in the chunk's labeled images c = B/K:
     peak = fixed + per_labeled_image * c
   (least squares over the points). `fixed` holds the variables: three
   networks (teacher, student, EMA student), two optimizers' slots and the
   gradients; `per_labeled_image` holds the activations of one labeled image
   and its mu unlabeled images in both views (1 + 2*mu input images).
   K=1 and K>1 differ in kind, not only in size: with K=1 the teacher's
   taped pass on all 1 + 2*mu images is alive while the student runs on its
   mu + 1; with K>1 the teacher is rematerialized chunk by chunk after the
   student's passes, so a chunk's peak is one network's pass.
3. Scale. Activation memory is proportional to the activation elements a
   pass keeps; these are counted as the output elements of every layer of
   the network for one image, from the layer shapes alone (the shapes-only
   build of benchmarks/flops.py, `mpl_tf.models.without_weights()`, so
   EfficientNet-L2 at 512 px costs seconds and no memory). The bytes per
   counted element of a family, measured at a small size, times the count
   of the preset's network at the preset's image size, is the preset's
   activation memory per labeled image. EfficientNet-B6-Wide and L2 cannot
   be built here (their variables alone exceed this machine's share), so
   the EfficientNet family's bytes per element come from EfficientNet-B0,
   which has the same blocks (MBConv, squeeze-and-excitation, swish, batch
   norm); images above 64 px, so the stem strides as at 512 px.
   The fit is checked by predicting each network at a second image size
   from the first and comparing with its own measurement.
4. Fits where. Per replica: the variables (bytes per parameter, from the
   fixed term of the largest measured network) plus the activations of one
   chunk (c = b/K labeled images of the per-replica batch b), against the
   device's memory less a reserved margin; the smallest K dividing b that
   fits.

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
GB = 1e9

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
    ('resnet_128', 'resnet-50', 128, 15, 1, 1, 'float32'),
    ('resnet_128', 'resnet-50', 128, 15, 2, 1, 'float32'),
    ('effnet', 'efficientnet-b0', 96, 8, 2, 1, 'float32'),
    ('effnet', 'efficientnet-b0', 96, 8, 4, 1, 'float32'),
    ('effnet', 'efficientnet-b0', 96, 8, 4, 2, 'float32'),
    ('effnet', 'efficientnet-b0', 96, 8, 8, 2, 'float32'),
    ('effnet_128', 'efficientnet-b0', 128, 8, 2, 1, 'float32'),
    ('effnet_128', 'efficientnet-b0', 128, 8, 4, 1, 'float32'),
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


def replica_bytes(static: float, per_labeled_k1: float,
                  per_labeled_chunk: float, batch: int, k: int) -> float:
  """Bytes one replica needs with per-replica labeled batch `batch` in k chunks."""
  per_image = per_labeled_k1 if k == 1 else per_labeled_chunk
  return static + per_image * batch / k


def smallest_k(capacity: float, margin: float, static: float,
               per_labeled_k1: float, per_labeled_chunk: float,
               batch: int):
  """The smallest K dividing `batch` whose replica fits, or None.

  Fits: replica_bytes <= (1 - margin) * capacity.
  """
  usable = (1.0 - margin) * capacity
  for k in range(1, batch + 1):
    if batch % k == 0 and replica_bytes(static, per_labeled_k1,
                                        per_labeled_chunk, batch,
                                        k) <= usable:
      return k
  return None


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
  previous = []
  if os.path.exists(args.output):
    with open(args.output) as f:
      previous = json.load(f).get('points', [])
  if args.table_only:
    results = previous
  else:
    todo = [p for p in POINTS if groups is None or p[0] in groups]
    results = [r for r in previous if groups is not None and
               r['group'] not in groups] + measure(todo)
  with open(args.output, 'w') as f:
    json.dump({'command': ' '.join(['benchmarks/activation_memory.py',
                                    *sys.argv[1:]]),
               'points': results}, f, indent=2, sort_keys=True)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
