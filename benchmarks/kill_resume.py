"""Kills training (and export) with SIGKILL at random moments, then resumes.

The record behind docs/reliability.md's promises of atomic checkpoints and
exports and of exact resumption: a small run (digits, wrn-10-1, a checkpoint
every device loop, evaluations in between) is killed `--kills` times after
random delays counted from the first progress line, so that kills land
inside steps, checkpoint writes and evaluations; every other kill waits,
after its delay, until a checkpoint write is seen in progress (its
temporary files exist) and lands inside that write. After every kill the model_dir must be consistent: the
CheckpointManager's state file names a checkpoint whose files are complete
and readable, and config.json and eval_history.json parse. A last
uninterrupted start then finishes the run, and every variable of every
network, optimizer slot, counter and RNG state in its final checkpoint must
equal (np.array_equal) the one of an uninterrupted run with the same seed.
Both runs use --deterministic (op determinism on CPU).

Then `--mode=export` is killed `--export_kills` times the same way: the
export directory must either not exist or hold a complete SavedModel.

  .venv/bin/python benchmarks/kill_resume.py [--kills=6] [--seed=0]

Prints one table row per kill and the comparison; exits 1 if a promise broke.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _flags(work, model_dir, num_steps):
  return ['--flagfile=' + os.path.join(REPO, 'flags', 'demo.cfg'),
          '--dataset=digits', f'--data_dir={os.path.join(work, "data")}',
          f'--model_dir={model_dir}', '--model=wrn-10-1',
          '--labeled_batch_size=4', '--uda_ratio=2',
          f'--num_steps={num_steps}', '--steps_per_loop=2',
          '--checkpoint_every=2', '--eval_every=10', '--keep_checkpoints=2',
          '--num_validation=100', '--num_test=100', '--labeled_per_class=2',
          '--nosupervised_baseline', '--deterministic']


def _command(*flags):
  return [sys.executable, os.path.join(REPO, 'main.py'), *flags]


# A progress line: the process has finished its first device loop (after
# start-up, restore and tracing), so it is now stepping and checkpointing.
_TRAINING = re.compile(r'^mpl \d+/\d+', re.MULTILINE)


def _write_in_progress(directory):
  """True while a checkpoint write's temporary files exist in directory."""
  try:
    return any('temp' in name for name in os.listdir(directory))
  except FileNotFoundError:
    return False


def _run(flags, log_path, delay=None, after_training_starts=False,
         in_write_of=None):
  """Runs main.py; with `delay`, SIGKILLs it then. Returns (killed, rc).

  With `after_training_starts`, the delay counts from the process's first
  progress line, so that kills land in steps and checkpoint writes rather
  than in the imports and the tracing, whose length varies with the load.
  With `in_write_of` (a checkpoint directory), the kill comes, after the
  delay, the moment a checkpoint write is seen in progress there (its
  temporary files exist), so it lands inside the write.
  """
  environment = dict(os.environ, PYTHONUNBUFFERED='1')
  with open(log_path, 'w') as log:
    process = subprocess.Popen(_command(*flags), stdout=log,
                               stderr=subprocess.STDOUT, cwd=REPO,
                               env=environment)
    if delay is not None and after_training_starts:
      while process.poll() is None:
        with open(log_path, errors='replace') as f:
          if _TRAINING.search(f.read().replace('\r', '\n')):
            break
        time.sleep(0.1)
    try:
      process.wait(timeout=delay)
      return False, process.returncode
    except subprocess.TimeoutExpired:
      pass
    while in_write_of and process.poll() is None:
      if _write_in_progress(in_write_of):
        break
      time.sleep(0.0005)
    if process.poll() is not None:
      return False, process.returncode
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True, process.returncode


def _last_line(log_path):
  with open(log_path, errors='replace') as f:
    lines = [line.strip() for line in f.read().replace('\r', '\n').split('\n')
             if line.strip() and not line.startswith(
                 ('{', '}', ' "', '  "', 'E0000', 'I0000', 'W0000',
                  'WARNING'))]
  return (lines[-1] if lines else '(nothing yet)')[:60].replace('|', '/')


def _check_model_dir(model_dir):
  """Raises AssertionError unless every file a reader trusts is whole."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for name in ('config.json', 'eval_history.json'):
    path = os.path.join(model_dir, name)
    if os.path.exists(path):
      with open(path) as f:
        json.load(f)
  found = {'torn': []}
  for sub in ('checkpoints', os.path.join('checkpoints', 'best')):
    directory = os.path.join(model_dir, sub)
    if not os.path.isdir(directory):
      continue
    # A write the kill interrupted leaves its temporary files behind
    # (tf.train.Checkpoint writes <prefix>_temp/ then renames): proof that
    # the kill landed inside a checkpoint write, which readers must ignore.
    found['torn'] += [name for name in os.listdir(directory) if 'temp' in name]
    latest = tf.train.latest_checkpoint(directory)
    state = os.path.join(directory, 'checkpoint')
    if os.path.exists(state):
      assert latest, f'{state} names no existing checkpoint'
    if latest:
      reader = tf.train.load_checkpoint(latest)
      for name, _ in tf.train.list_variables(latest):
        reader.get_tensor(name)   # reads every tensor: no torn data file
      found[sub] = os.path.basename(latest)
  return found


def _variables(prefix):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  reader = tf.train.load_checkpoint(prefix)
  return {name: reader.get_tensor(name)
          for name, _ in tf.train.list_variables(prefix)
          if name != '_CHECKPOINTABLE_OBJECT_GRAPH'}


def _check_export(export_dir):
  """'absent' or 'complete'; raises AssertionError if half-written."""
  if not os.path.exists(export_dir):
    return 'absent'
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  assert os.path.exists(os.path.join(export_dir, 'saved_model.pb')), export_dir
  loaded = tf.saved_model.load(export_dir)
  assert 'serving_default' in loaded.signatures, export_dir
  return 'complete'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kills', type=int, default=6)
  parser.add_argument('--export_kills', type=int, default=3)
  parser.add_argument('--num_steps', type=int, default=800)
  parser.add_argument('--min_delay', type=float, default=1.0)
  parser.add_argument('--max_delay', type=float, default=20.0,
                      help='seconds after the first progress line')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--keep', action='store_true',
                      help='keep the work directory')
  args = parser.parse_args()
  rng = random.Random(args.seed)
  work = tempfile.mkdtemp(prefix='kill_resume_')
  reference_dir = os.path.join(work, 'reference')
  killed_dir = os.path.join(work, 'killed')
  broken = []

  start = time.time()
  killed, rc = _run(_flags(work, reference_dir, args.num_steps),
                    os.path.join(work, 'reference.log'))
  assert not killed and rc == 0, open(os.path.join(work, 'reference.log')).read()
  print(f'uninterrupted reference run: {time.time() - start:.0f} s')

  print('\n| kill | after (s) | last output before the kill | latest checkpoint '
        'after | best | interrupted write left | consistent |')
  print('|---|---|---|---|---|---|---|')
  for index in range(args.kills):
    delay = rng.uniform(args.min_delay, args.max_delay)
    log_path = os.path.join(work, f'kill{index}.log')
    # Every other kill waits for a checkpoint write to be in progress.
    in_write = index % 2 == 1
    killed, rc = _run(_flags(work, killed_dir, args.num_steps), log_path,
                      delay, after_training_starts=True,
                      in_write_of=(os.path.join(killed_dir, 'checkpoints')
                                   if in_write else None))
    try:
      found = _check_model_dir(killed_dir)
      consistent = 'yes'
    except AssertionError as error:   # a broken promise, reported below
      found, consistent = {}, f'NO: {error}'
      broken.append(f'kill {index}: {error}')
    what = ('killed in a checkpoint write' if killed and in_write else
            'killed' if killed else f'finished (rc {rc})')
    torn = ', '.join(found.get('torn', [])) or '-'
    print(f'| {index + 1} | {delay:.1f} ({what}) | {_last_line(log_path)} | '
          f'{found.get("checkpoints", "-")} | '
          f'{found.get(os.path.join("checkpoints", "best"), "-")} | '
          f'{torn} | {consistent} |')

  killed, rc = _run(_flags(work, killed_dir, args.num_steps),
                    os.path.join(work, 'final.log'))
  if killed or rc != 0:
    broken.append(f'final resume failed (rc {rc}); see {work}/final.log')
  else:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    ends = [tf.train.latest_checkpoint(os.path.join(d, 'checkpoints'))
            for d in (reference_dir, killed_dir)]
    reference, resumed = _variables(ends[0]), _variables(ends[1])
    differing = [name for name in reference
                 if not np.array_equal(reference[name], resumed.get(name))]
    largest = max((float(np.max(np.abs(reference[n].astype(np.float64) -
                                       resumed[n].astype(np.float64))))
                   for n in differing if n in resumed), default=0.0)
    print(f'\nfinal checkpoints {os.path.basename(ends[0])} vs '
          f'{os.path.basename(ends[1])}: {len(reference)} variables, '
          f'{len(reference) - len(differing)} bitwise equal, '
          f'{len(differing)} differ (largest difference {largest:.3g})')
    if differing or set(reference) != set(resumed):
      broken.append(f'resumed weights differ: {differing[:5]}')

  export_dir = os.path.join(work, 'export', '1')
  export_flags = _flags(work, killed_dir, args.num_steps) + [
      '--mode=export', f'--export_dir={export_dir}']
  # A first export, timed; the kills then land in exports that replace it
  # (rename the old one away, rename the new one in), the riskier path.
  export_start = time.time()
  killed, rc = _run(export_flags, os.path.join(work, 'export_first.log'))
  export_seconds = time.time() - export_start
  print(f'\nfirst export: {_check_export(export_dir)} in {export_seconds:.0f} s')
  print('\n| export kill | after (s) | export_dir after |')
  print('|---|---|---|')
  for index in range(args.export_kills):
    delay = rng.uniform(0.4, 1.0) * export_seconds
    killed, rc = _run(export_flags, os.path.join(work, f'export{index}.log'),
                      delay)
    try:
      state = _check_export(export_dir)
    except Exception as error:  # pylint: disable=broad-except
      state = f'HALF-WRITTEN: {error}'
      broken.append(f'export kill {index}: {error}')
    what = 'killed' if killed else f'finished (rc {rc})'
    print(f'| {index + 1} | {delay:.1f} ({what}) | {state} |')
  killed, rc = _run(export_flags, os.path.join(work, 'export_final.log'))
  final_state = _check_export(export_dir) if rc == 0 else f'failed (rc {rc})'
  print(f'final export: {final_state}')
  if rc != 0:
    broken.append('final export failed')

  print(f'\ntotal {time.time() - start:.0f} s; ' +
        ('ALL PROMISES HELD' if not broken else 'BROKEN: ' + '; '.join(broken)))
  if args.keep or broken:
    print(f'work directory kept: {work}')
  else:
    shutil.rmtree(work, ignore_errors=True)
  sys.exit(1 if broken else 0)


if __name__ == '__main__':
  main()
