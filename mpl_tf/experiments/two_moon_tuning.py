"""Does MPL help on TwoMoon anywhere? A grid over what could make it.

    python experiment.py two_moon_tuning --output_dir=docs

The default TwoMoon run (two_moon.py) shows no effect of the feedback: |h| is
~1e-3 and Pseudo Labels and MPL draw the same boundary. Before concluding
anything we vary what sets the strength and the noise of the feedback:

  num_steps        1,000 or 3,000 (time for the feedback to add up);
  unlabeled_batch  64 or all 1,994 points (full batch: no sampling noise
                   in which points the student sees);
  student_lr       0.5 or 2.0 (h is proportional to the student's step);
  mpl_weight       1 or 30 (the MPL term against the teacher's labeled loss);

all 16 combinations, then a few single settings that reduce the variance of
the REINFORCE-like estimate (small unlabeled batches for per-point credit,
the moving-average baseline, argmax labels) or change the teacher (slower
rate, no momentum), and a noisier moon. Every setting runs Pseudo Labels
(mpl_weight=0) and MPL on the same seeds, data and initial weights, so the
per-seed gap is the feedback's effect alone.

Writes `<output_dir>/results/two_moon_tuning.json`: per setting the two
students' and the MPL teacher's mean test accuracy, the per-seed gaps, how
many seeds MPL won by more than one test point (and lost), and mean |h|.
"""

import dataclasses
import itertools
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from mpl_tf import storage
from mpl_tf.config import ConfigError
from mpl_tf.experiments import checks
from mpl_tf.experiments import two_moon as two_moon_lib

# (name, TwoMoonConfig overrides, MplConfig overrides of the MPL run).
Setting = Tuple[str, Dict[str, Any], Dict[str, Any]]


def settings() -> List[Setting]:
  """The 16-point grid, then the single settings (see the module doc)."""
  grid = []
  for steps, batch, student_lr, weight in itertools.product(
      (1000, 3000), (64, 0), (0.5, 2.0), (1.0, 30.0)):
    name = (f'steps={steps} batch={batch or "all"} student_lr={student_lr:g}'
            f' mpl_weight={weight:g}')
    grid.append((name, dict(num_steps=steps, unlabeled_batch=batch,
                            student_lr=student_lr, mpl_weight=weight), {}))
  # Every setting sets these four (the command takes no flag for them), so
  # a row named batch=64 draws 64 points whatever the base's batch.
  common = dict(num_steps=3000, student_lr=1.0, unlabeled_batch=64)
  grid += [
      ('batch=8 mpl_weight=10', dict(common, unlabeled_batch=8,
                                     mpl_weight=10.0), {}),
      ('batch=8 mpl_weight=10 baseline=0.99',
       dict(common, unlabeled_batch=8, mpl_weight=10.0),
       {'baseline_decay': 0.99}),
      ('batch=64 mpl_weight=10 baseline=0.99',
       dict(common, mpl_weight=10.0), {'baseline_decay': 0.99}),
      ('batch=64 mpl_weight=3 argmax', dict(common, mpl_weight=3.0),
       {'pseudo_label': 'argmax'}),
      ('batch=64 mpl_weight=3 teacher_lr=0.05',
       dict(common, mpl_weight=3.0, teacher_lr=0.05), {}),
      ('batch=64 mpl_weight=3 momentum=0 baseline=0.99',
       dict(common, mpl_weight=3.0, momentum=0.0), {'baseline_decay': 0.99}),
      ('batch=64 mpl_weight=3 noise=0.15 student_lr=0.5',
       dict(common, mpl_weight=3.0, noise=0.15, student_lr=0.5), {}),
  ]
  return grid


def check(base: two_moon_lib.TwoMoonConfig, num_seeds: int) -> None:
  """Refuses a base or seed count some setting cannot run (checks.py: why).

  Each setting replaces fields of `base`, so every setting's config is
  checked, before the first one trains for minutes. The seeds and the
  grid's batches come first: they, not base's own (unused) batch, are what
  a too small --unlabeled_per_class cannot serve.
  """
  checks.at_least('tuning_seeds', num_seeds, 1,
                  'seeds each setting runs Pseudo Labels and MPL on')
  checks.seeds('first_seed', base.first_seed, num_seeds,
               two_moon_lib.TEST_SEED_OFFSET)
  checks.at_least('unlabeled_per_class', base.unlabeled_per_class, 1,
                  'unlabeled points per class')
  batch = max(fields['unlabeled_batch']
              for _, fields, _ in settings())
  if batch > two_moon_lib.NUM_CLASSES * base.unlabeled_per_class:
    raise ConfigError(
        f'--unlabeled_per_class={base.unlabeled_per_class}: the grid\'s '
        f'settings draw up to {batch} unlabeled points per step, from 2 x '
        f'{base.unlabeled_per_class}; pass at least {-(-batch // 2)}.')
  base.check()
  for name, fields, _ in settings():
    try:
      dataclasses.replace(base, **fields).check()
    except ConfigError as error:
      raise ConfigError(f'the setting {name!r}: {error}') from None


def run_setting(base: two_moon_lib.TwoMoonConfig, setting: Setting,
                seeds: List[int]) -> Dict[str, Any]:
  """Pseudo Labels and MPL of one setting on every seed."""
  name, fields, mpl_overrides = setting
  config = dataclasses.replace(base, **fields)
  rows = []
  for seed in seeds:
    data = two_moon_lib.make_data(config, seed)
    test = lambda model: two_moon_lib.accuracy(model, data.x_test, data.y_test)
    pl_student, _, _ = two_moon_lib.train_mpl(
        config, data, seed, two_moon_lib.mpl_config(config, mpl_weight=0.0))
    student, teacher, feedback = two_moon_lib.train_mpl(
        config, data, seed, two_moon_lib.mpl_config(config, **mpl_overrides))
    rows.append({'seed': seed, 'pseudo_labels': test(pl_student),
                 'mpl': test(student), 'mpl_teacher': test(teacher),
                 **feedback})
  one_point = 1.0 / config.test_points
  gaps = [r['mpl'] - r['pseudo_labels'] for r in rows]
  mean = lambda key: float(np.mean([r[key] for r in rows]))
  return {'name': name, 'two_moon': fields, 'mpl': mpl_overrides,
          'pseudo_labels': mean('pseudo_labels'), 'mpl_student': mean('mpl'),
          'mpl_teacher': mean('mpl_teacher'),
          'mean_gap': float(np.mean(gaps)),
          'mpl_wins': sum(g > one_point for g in gaps),
          'mpl_losses': sum(g < -one_point for g in gaps),
          'h_mean_abs': mean('h_mean_abs'),
          'h_positive_fraction': mean('h_positive_fraction'), 'runs': rows}


def run(base: two_moon_lib.TwoMoonConfig, num_seeds: int,
        output_dir: Optional[str], command: str = '',
        log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Every setting; rewrites the JSON after each, so a stop keeps results."""
  check(base, num_seeds)
  start = time.time()
  seeds = list(range(base.first_seed, base.first_seed + num_seeds))
  payload = {'command': command, 'base': dataclasses.asdict(base),
             'seeds': seeds, 'settings': []}
  path = (os.path.join(output_dir, 'results', 'two_moon_tuning.json')
          if output_dir else None)
  for setting in settings():
    setting_start = time.time()
    result = run_setting(base, setting, seeds)
    payload['settings'].append(result)
    payload['seconds'] = time.time() - start
    log(f'{result["name"]:<52} PL {result["pseudo_labels"]:.4f}  MPL '
        f'{result["mpl_student"]:.4f}  wins/losses {result["mpl_wins"]}/'
        f'{result["mpl_losses"]}  |h| {result["h_mean_abs"]:.2g} '
        f'({time.time() - setting_start:.0f} s)')
    if path:
      storage.write_json(path, payload)
  log(f'{len(payload["settings"])} settings x {num_seeds} seeds in '
      f'{payload["seconds"]:.0f} s' + (f'; wrote {path}' if path else ''))
  return payload
