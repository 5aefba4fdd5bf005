"""Benchmark: images per second of the CIFAR MPL input stream on this machine,
printed beside the MPL training step's consumption at the same batch.

  .venv/bin/python benchmarks/input_pipeline.py            # B=64, mu=7
  .venv/bin/python benchmarks/input_pipeline.py --skip_step --step_seconds=13

The stream is the one training reads (`pipeline.train_dataset`): B labeled
images (flip, pad 4 with 128, crop) and B*mu unlabeled images in two views
(the 'aug' view: RandAugment N=2 M=16 with the paper's op list, Cutout 16,
flip/pad/crop). It reads 32x32 RGB noise written as PNG TFRecords by our
writer (noise is the worst case for PNG decoding; no CIFAR ships offline).
"Images" counts every view the step consumes: B + 2*B*mu per step.

The step is the MPL step (WRN-28-2 teacher and student, exact feedback) on
the same batch shapes, timed after its first (tracing) call. The pipeline must
deliver at least 3x what the step consumes, so it never starves the step.
Writes a JSON of the numbers to --output.
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from mpl_tf import config as config_lib  # pylint: disable=g-import-not-at-top
from mpl_tf.data import pipeline  # pylint: disable=g-import-not-at-top
from mpl_tf.data import records  # pylint: disable=g-import-not-at-top

_NUM_CLASSES = 10


def _write_noise_set(data_dir: str, num_labeled: int, num_unlabeled: int):
  rng = np.random.default_rng(0)
  counts = {'labeled': num_labeled, 'unlabeled': num_unlabeled,
            'validation': 0, 'test': 0}
  for split, count in counts.items():
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, _NUM_CLASSES, count)
    records.write_split(data_dir, split, images, labels, num_shards=4)
  manifest = {'dataset': 'noise32', 'source': 'noise32',
              'num_classes': _NUM_CLASSES, 'image_size': 32, 'channels': 3,
              'counts': counts, 'mean': [127.5] * 3, 'std': [73.6] * 3}
  records.write_manifest(data_dir, manifest)
  return manifest


def _cifar_config(data_dir: str, batch: int, mu: int) -> config_lib.Config:
  data = config_lib.DataConfig(
      dataset='noise32', data_dir=data_dir, horizontal_flip=True,
      randaugment_layers=2, randaugment_magnitude=16.0,
      randaugment_ops='paper', cutout_size=16)
  optim = config_lib.OptimConfig(labeled_batch_size=batch, uda_ratio=mu)
  return config_lib.Config(data=data, optim=optim)


def measure_pipeline(config, manifest, num_batches: int):
  iterator = iter(pipeline.train_dataset(config, manifest))
  for _ in range(3):  # Warm-up: threads, autotuning, shuffle buffer fill.
    next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
  _ = batch['unlabeled_images_aug'].numpy()
  return (time.perf_counter() - start) / num_batches


def measure_step(config, num_steps: int):
  """Seconds per MPL step (WRN-28-2 x2) at the config's batch shapes."""
  from mpl_tf import optim  # pylint: disable=g-import-not-at-top
  from mpl_tf.models import build_model  # pylint: disable=g-import-not-at-top
  from mpl_tf.mpl_step import MplStep  # pylint: disable=g-import-not-at-top
  batch, unlabeled = config.optim.labeled_batch_size, config.unlabeled_batch_size
  teacher_lr, student_lr = optim.learning_rates(config.optim)
  teacher = build_model(config.model, _NUM_CLASSES, 32, 'teacher')
  student = build_model(config.model, _NUM_CLASSES, 32, 'student')
  step = MplStep(config.mpl, config.optim, teacher, student,
                 optim.make_optimizer(teacher_lr, config.optim, 't_opt'),
                 optim.make_optimizer(student_lr, config.optim, 's_opt'),
                 global_labeled_batch=batch, global_unlabeled_batch=unlabeled)
  rng = np.random.default_rng(0)
  inputs = {
      'labeled_images': tf.constant(rng.normal(size=(batch, 32, 32, 3)),
                                    tf.float32),
      'labels': tf.constant(rng.integers(0, _NUM_CLASSES, batch), tf.int32),
      'unlabeled_images_ori': tf.constant(
          rng.normal(size=(unlabeled, 32, 32, 3)), tf.float32),
      'unlabeled_images_aug': tf.constant(
          rng.normal(size=(unlabeled, 32, 32, 3)), tf.float32)}
  step_fn = tf.function(lambda b: step(b)[0]['mpl/h'])
  step_fn(inputs).numpy()  # Trace.
  start = time.perf_counter()
  for _ in range(num_steps):
    step_fn(inputs).numpy()
  return (time.perf_counter() - start) / num_steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--mu', type=int, default=7)
  parser.add_argument('--num_batches', type=int, default=100)
  parser.add_argument('--num_steps', type=int, default=2)
  parser.add_argument('--skip_step', action='store_true',
                      help='Do not time the MPL step; use --step_seconds.')
  parser.add_argument('--step_seconds', type=float, default=0.0)
  parser.add_argument('--output', default='benchmarks/input_pipeline.json')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as data_dir:
    manifest = _write_noise_set(data_dir, 4_000, 10_000)
    config = _cifar_config(data_dir, args.batch, args.mu)
    seconds_per_batch = measure_pipeline(config, manifest, args.num_batches)
  views_per_step = args.batch + 2 * args.batch * args.mu
  step_seconds = (args.step_seconds if args.skip_step
                  else measure_step(config, args.num_steps))
  result = {
      'batch': args.batch, 'mu': args.mu, 'views_per_step': views_per_step,
      'cpu_count': os.cpu_count(),
      'pipeline_seconds_per_batch': seconds_per_batch,
      'pipeline_images_per_second': views_per_step / seconds_per_batch,
      'step_seconds': step_seconds,
      'step_images_per_second': (views_per_step / step_seconds
                                 if step_seconds else None),
  }
  if step_seconds:
    result['pipeline_over_step'] = step_seconds / seconds_per_batch
  print(f'B={args.batch}, mu={args.mu}: {views_per_step} images per step '
        f'(B labeled + 2 views of B*mu unlabeled)')
  print(f'  input pipeline : {result["pipeline_images_per_second"]:8.1f} '
        f'images/s ({seconds_per_batch:.3f} s per batch)')
  if step_seconds:
    print(f'  MPL step       : {result["step_images_per_second"]:8.1f} '
          f'images/s ({step_seconds:.2f} s per step)')
    print(f'  pipeline / step: {result["pipeline_over_step"]:8.1f}x '
          f'(target >= 3x)')
  with open(args.output, 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  from mpl_tf import malloc_tuning  # pylint: disable=g-import-not-at-top
  malloc_tuning.tune()  # as main.py does (mpl_tf/malloc_tuning.py)
  main()
