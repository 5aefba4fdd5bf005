"""Runs the README's demo (flags/demo.cfg) for a wall time; memory, throughput.

A long run must not grow: this trains the demo configuration in-process for
`--minutes` (default 30; num_steps is raised so the time, not the step
count, ends it) and prints, per interval, the steps done, steps/s, the
current resident memory (VmRSS from /proc/self/status, sampled by a thread
every second) and the peak so far (ru_maxrss). Memory should level off after
the first loops (tracing, the input pipeline's buffers) and throughput stay
steady. No dependency beyond the project's: /proc and `resource` only.

  .venv/bin/python benchmarks/load_run.py [--minutes=30] [--interval=60]

Exits 1 if memory grew by more than --max_rss_growth_mb between the second
interval and the last, or an interval's steps/s strayed more than
--max_rate_spread from the median (judged after the first interval).
"""

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _vm_rss_mb() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024.0
  return float('nan')


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Sampler(threading.Thread):
  """Samples VmRSS every second; `window()` returns and resets the max."""

  def __init__(self):
    super().__init__(daemon=True)
    self._lock = threading.Lock()
    self._window_max = 0.0
    self.stop = threading.Event()

  def run(self):
    while not self.stop.is_set():
      rss = _vm_rss_mb()
      with self._lock:
        self._window_max = max(self._window_max, rss)
      self.stop.wait(1.0)

  def window(self) -> float:
    with self._lock:
      value, self._window_max = self._window_max, 0.0
    return value


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--minutes', type=float, default=30.0)
  parser.add_argument('--interval', type=float, default=60.0,
                      help='seconds per reported interval')
  parser.add_argument('--model_dir', default='')
  parser.add_argument('--max_rss_growth_mb', type=float, default=200.0)
  parser.add_argument('--max_rate_spread', type=float, default=0.15)
  args = parser.parse_args()

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from flags import definitions  # pylint: disable=g-import-not-at-top
  from mpl_tf import progress  # pylint: disable=g-import-not-at-top
  from mpl_tf import train  # pylint: disable=g-import-not-at-top
  tf.get_logger().setLevel('ERROR')

  model_dir = args.model_dir or tempfile.mkdtemp(prefix='load_run_')
  flag_values = absl_flags.FlagValues()
  definitions.define(flag_values)
  flag_values(['load_run',
               '--flagfile=' + os.path.join(REPO, 'flags', 'demo.cfg'),
               f'--data_dir={os.path.join(REPO, "data", "mnist5k")}',
               f'--model_dir={model_dir}', '--num_steps=1000000',
               '--checkpoint_every=500', '--nosupervised_baseline'])
  config = definitions.to_config(flag_values)

  sampler = _Sampler()
  sampler.start()
  print(f'start: VmRSS {_vm_rss_mb():.0f} MB, ru_maxrss {_peak_rss_mb():.0f} '
        f'MB (after importing TensorFlow)')
  deadline = time.time() + args.minutes * 60
  rows = []
  state = {'start': time.time(), 'step': 0, 'next': time.time() + args.interval}

  class _Stop(Exception):
    pass

  original_update = progress.Progress.update

  def update(progress, step, metrics):
    original_update(progress, step, metrics)
    now = time.time()
    if now >= state['next'] or now >= deadline:
      steps = step - state['step']
      rows.append((len(rows) + 1, step, steps / (now - state['start']),
                   sampler.window(), _vm_rss_mb(), _peak_rss_mb()))
      state.update(start=now, step=step, next=now + args.interval)
      print(f'  interval {rows[-1][0]}: step {step}, {rows[-1][2]:.2f} '
            f'steps/s, VmRSS max {rows[-1][3]:.0f} MB, peak '
            f'{rows[-1][5]:.0f} MB', flush=True)
    if now >= deadline:
      raise _Stop()

  progress.Progress.update = update
  try:
    train.run(config)
  except _Stop:
    pass
  finally:
    progress.Progress.update = original_update
    sampler.stop.set()

  print(f'\n{args.minutes:g} minutes of flags/demo.cfg ({config.model.name}, '
        f'{config.data.dataset} {config.data.image_size}px), '
        f'steps_per_loop={config.run.steps_per_loop}, checkpoint every '
        f'{config.run.checkpoint_every} steps')
  print('| interval | step at end | steps/s | max VmRSS (MB) | VmRSS at end '
        '(MB) | ru_maxrss (MB) |')
  print('|---|---|---|---|---|---|')
  for row in rows:
    print('| {} | {} | {:.2f} | {:.0f} | {:.0f} | {:.0f} |'.format(*row))
  if not args.model_dir:
    shutil.rmtree(model_dir, ignore_errors=True)
  sys.exit(0 if _promises_held(rows, args) else 1)


def _promises_held(rows, args) -> bool:
  """Flat memory and steady throughput after the first interval (warm-up).

  Memory: the largest VmRSS of the last interval is at most
  `--max_rss_growth_mb` above that of the second. Throughput: every interval
  after the first (the last may be partial) is within `--max_rate_spread`
  of the median rate.
  """
  steady = rows[1:]
  if len(steady) < 2:
    print('too few intervals to judge; run longer')
    return False
  growth = steady[-1][3] - steady[0][3]
  rates = [row[2] for row in steady[:-1]] or [steady[0][2]]
  median = sorted(rates)[len(rates) // 2]
  spread = max(abs(rate / median - 1.0) for rate in rates)
  memory_ok = growth <= args.max_rss_growth_mb
  rate_ok = spread <= args.max_rate_spread
  print(f'memory: max VmRSS {steady[0][3]:.0f} MB in interval 2, '
        f'{steady[-1][3]:.0f} MB in the last ({growth:+.0f} MB; limit '
        f'+{args.max_rss_growth_mb:.0f}): {"flat" if memory_ok else "GROWS"}')
  print(f'throughput: median {median:.2f} steps/s, largest deviation '
        f'{spread:.1%} (limit {args.max_rate_spread:.0%}): '
        f'{"steady" if rate_ok else "UNSTEADY"}')
  return memory_ok and rate_ok


if __name__ == '__main__':
  main()
