"""A/B of the batch-norm kernels in one process, timed in alternation.

  .venv/bin/python benchmarks/interleaved_ab.py                    # 8x7 fp32
  .venv/bin/python benchmarks/interleaved_ab.py --case=mpl_exact:8x7:mixed_bfloat16:noxla

On a machine shared with other jobs, two separate step_benchmark.py runs
measure the neighbours as much as the change: a run that loses a core for a
minute looks 50% slower. Here both steps are built in one process (the same
`_build_loop` as step_benchmark.py, with `batch_norm_kernel` keras and
fused), traced and warmed up, then timed in --rounds rounds of --steps
steps each, in the order A B, B A, A B, ..., so a slow period costs both
about equally. Reports the median and the minimum seconds per step and the
median user CPU per step of each, and the fp32 matmul peak measured after.
Both networks live at once, so the peak RSS is not either one's (use
step_benchmark.py for memory).
"""

import argparse
import json
import os
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
sys.path.insert(0, REPO)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--case', default='mpl_exact:8x7:float32:noxla')
  parser.add_argument('--rounds', type=int, default=8)
  parser.add_argument('--steps', type=int, default=2,
                      help='Steps per timed call.')
  parser.add_argument('--model', default='wrn-28-2')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--output', default='')
  args = parser.parse_args()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from mpl_tf import malloc_tuning  # pylint: disable=g-import-not-at-top
  malloc_tuning.tune()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import step_benchmark  # pylint: disable=g-import-not-at-top

  kernels = ('keras', 'fused')
  loops = {}
  for kernel in kernels:
    case = dict(step_benchmark.parse_case(args.case), model=args.model,
                image_size=args.image_size, batch_norm_kernel=kernel)
    loop, iterator, forward_flops = step_benchmark._build_loop(case)  # pylint: disable=protected-access
    for _ in range(2):  # Trace, then warm up.
      loop(iterator, tf.constant(1))['health/nonfinite'].numpy()
    loops[kernel] = (loop, iterator)
  timings = {kernel: [] for kernel in kernels}
  for round_ in range(args.rounds):
    for kernel in kernels if round_ % 2 == 0 else kernels[::-1]:
      loop, iterator = loops[kernel]
      user = resource.getrusage(resource.RUSAGE_SELF).ru_utime
      start = time.perf_counter()
      loop(iterator, tf.constant(args.steps))['health/nonfinite'].numpy()
      timings[kernel].append({
          'seconds_per_step': (time.perf_counter() - start) / args.steps,
          'user_cpu_per_step': (resource.getrusage(
              resource.RUSAGE_SELF).ru_utime - user) / args.steps})
  peak = step_benchmark._matmul_peak(tf.float32)  # pylint: disable=protected-access
  _, flops = step_benchmark.images_and_flops(
      case['step'], case['batch'], case['mu'], forward_flops,
      case['microbatches'])
  result = {'case': args.case, 'model': args.model, 'rounds': args.rounds,
            'steps_per_call': args.steps, 'fp32_matmul_peak_gflops': peak,
            'gflops_per_step': flops / 1e9, 'kernels': {}}
  for kernel in kernels:
    walls = sorted(t['seconds_per_step'] for t in timings[kernel])
    users = sorted(t['user_cpu_per_step'] for t in timings[kernel])
    summary = {'median_seconds_per_step': walls[len(walls) // 2],
               'min_seconds_per_step': walls[0],
               'median_user_cpu_per_step': users[len(users) // 2],
               'calls': timings[kernel]}
    result['kernels'][kernel] = summary
    print(f'{kernel}: median {summary["median_seconds_per_step"]:.3f} s/step '
          f'(min {walls[0]:.3f}; {flops / 1e9 / walls[len(walls) // 2]:.1f} '
          f'GFLOP/s at the median), user CPU '
          f'{summary["median_user_cpu_per_step"]:.2f} s/step; calls: '
          + ', '.join(f'{w:.3f}' for w in (
              t['seconds_per_step'] for t in timings[kernel])))
  ratio = (result['kernels']['fused']['median_seconds_per_step'] /
           result['kernels']['keras']['median_seconds_per_step'])
  print(f'fused / keras median: {ratio:.3f}; fp32 matmul peak {peak:.0f} '
        f'GFLOP/s (measured after)')
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(result, f, indent=2, sort_keys=True)
    print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
