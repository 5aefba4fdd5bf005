"""The disputed choices of Meta Pseudo Labels, each varied alone, over seeds.

    python experiment.py ablation --output_dir=docs \
        --ablation_tasks=two_moon,digits

Every variant is the base (Algorithm 1: sampled labels, exact h, paper sign,
no baseline, mpl_weight 1) with exactly one MplConfig field changed:

  algorithm_1     the base itself
  argmax          pseudo_label=argmax
  soft            pseudo_label=soft (released code; zero MPL gradient)
  taylor          feedback=taylor (released code's h)
  released_sign   feedback_sign=released_code (h = new - old)
  baseline_0.99   baseline_decay=0.99 (released code)
  mpl_weight_0    mpl_weight=0 (no feedback at all)

The base sets baseline_init=uniform_sqrt3 (the released code's), which is
inert while baseline_decay=0, so baseline_0.99 differs from it in the decay
alone and starts its baseline where the released code does.

Tasks:
  two_moon  the TwoMoon setup of two_moon.py (no UDA), many seeds; reports
            the student's and the teacher's test accuracy.
  digits    scikit-learn's 1,797 digits through `mpl_tf.train.run` (the
            whole product path: pipeline, UDA teacher, EMA student), a small
            WRN, few steps, few seeds; reports the test top-1 of the EMA
            student, the student and the teacher. The caller passes the
            base Config (AblationConfig.image: experiment.py builds it with
            flags/definitions.py from flags/experiment_flags.py's
            IMAGE_ARGS); each variant is dataclasses.replace of it, validated
            like every Config, and every run gets its own temporary
            model_dir.

Writes `<output_dir>/results/ablation_<task>.json` after every run, so an
interrupted grid keeps what it measured.
"""

import dataclasses
import os
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mpl_tf import storage
from mpl_tf.config import Config, ConfigError, MplConfig
from mpl_tf.config_checks import validate
from mpl_tf.experiments import checks
from mpl_tf.experiments import two_moon as two_moon_lib

TASKS = ('two_moon', 'digits')
# The base every variant departs from: Algorithm 1.
BASE_FIELDS = dict(pseudo_label='sampled', feedback='exact',
                   feedback_sign='paper', baseline_decay=0.0,
                   baseline_init='uniform_sqrt3', mpl_weight=1.0)
VARIANTS = {
    'algorithm_1': {},
    'argmax': {'pseudo_label': 'argmax'},
    'soft': {'pseudo_label': 'soft'},
    'taylor': {'feedback': 'taylor'},
    'released_sign': {'feedback_sign': 'released_code'},
    'baseline_0.99': {'baseline_decay': 0.99},
    'mpl_weight_0': {'mpl_weight': 0.0},
}
IMAGE_NETWORKS = {'ema_student': 'mpl_ema_student', 'student': 'mpl_student',
                  'teacher': 'mpl_teacher'}


@dataclasses.dataclass(frozen=True)
class AblationConfig:
  """What the ablation command runs; flags/experiment_flags.py fills it."""
  tasks: Tuple[str, ...] = TASKS
  variants: Tuple[str, ...] = tuple(VARIANTS)
  two_moon: two_moon_lib.TwoMoonConfig = two_moon_lib.TwoMoonConfig()
  two_moon_seeds: int = 10
  image_seeds: int = 2
  # The digits runs' base Config, from the caller (the digits task only);
  # each run replaces its MplConfig, seed and model_dir.
  image: Optional[Config] = None

  def check(self) -> None:
    """Refuses what would run nothing or fail after the first task.

    Tasks run one after the other, so the digits runs' network is built
    here (without weights: a tenth of a second for wrn-10-1) rather than
    found unknown after the two_moon task has trained; checks.py says why.
    """
    checks.values('ablation_tasks', self.tasks, lambda t: t in TASKS,
                  f'must be one of {", ".join(TASKS)}', TASKS)
    checks.values('variants', self.variants, lambda v: v in VARIANTS,
                  f'must be one of {", ".join(VARIANTS)}', tuple(VARIANTS))
    self.two_moon.check()
    checks.at_least('two_moon_seeds', self.two_moon_seeds, 1,
                    'seeds per variant of the two_moon task')
    checks.at_least('image_seeds', self.image_seeds, 1,
                    'seeds per variant of the digits task')
    if 'digits' in self.tasks:
      image = image_config(self, tempfile.gettempdir())
      from mpl_tf import models  # pylint: disable=g-import-not-at-top
      try:
        models.count_parameters(image.model, 2, image.data.image_size)
      except ConfigError as error:
        raise ConfigError(f'--image_model={image.model.name}: {error}'
                          ) from None


def variant_config(base: MplConfig, variant: str) -> MplConfig:
  """`base` with BASE_FIELDS, then the variant's one change."""
  if variant not in VARIANTS:
    raise ValueError(f'Unknown variant {variant!r}; choose from '
                     f'{", ".join(VARIANTS)}.')
  return dataclasses.replace(base, **{**BASE_FIELDS, **VARIANTS[variant]})


def grid(base: MplConfig, variants: Sequence[str] = tuple(VARIANTS)
         ) -> Dict[str, MplConfig]:
  """{variant: its MplConfig} for the given variants, in order."""
  return {variant: variant_config(base, variant) for variant in variants}


def image_config(config: AblationConfig, model_dir: str,
                 mpl: Optional[MplConfig] = None, **run_fields) -> Config:
  """config.image with `model_dir`, `mpl` and `run_fields`, validated."""
  if config.image is None:
    raise ConfigError('the digits task needs AblationConfig.image, the base '
                      'Config of its runs (experiment.py builds it from the '
                      '--image_* flags).')
  base = config.image
  return validate(dataclasses.replace(
      base, mpl=base.mpl if mpl is None else mpl,
      run=dataclasses.replace(base.run, model_dir=model_dir, **run_fields)))


def _summary(values: List[float]) -> Dict[str, float]:
  return two_moon_lib.mean_std(values)


def run_two_moon_variant(config: AblationConfig, mpl: MplConfig,
                         seed: int) -> Dict[str, Any]:
  """One TwoMoon MPL run: the student's and the teacher's test accuracy."""
  data = two_moon_lib.make_data(config.two_moon, seed)
  student, teacher, diagnostics = two_moon_lib.train_mpl(config.two_moon, data,
                                                     seed, mpl)
  return {'seed': seed,
          'student': two_moon_lib.accuracy(student, data.x_test, data.y_test),
          'teacher': two_moon_lib.accuracy(teacher, data.x_test, data.y_test),
          **diagnostics}


def run_image_variant(config: AblationConfig, mpl: MplConfig,
                      seed: int) -> Dict[str, Any]:
  """One digits MPL run through train.run in a temporary model_dir."""
  from mpl_tf import train  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix='mpl_ablation_',
                                   ignore_cleanup_errors=True) as model_dir:
    results = train.run(image_config(config, model_dir, mpl, seed=seed))
  row = {'seed': seed, 'train_seconds': results['timings']['train_seconds']}
  for network, key in IMAGE_NETWORKS.items():
    row[network] = results[key]['test']['top1']
  return row


def _base_mpl(config: AblationConfig, task: str) -> MplConfig:
  """The non-disputed MplConfig fields of a task (UDA settings and so on)."""
  if task == 'two_moon':
    return two_moon_lib.mpl_config(config.two_moon)
  return image_config(config, tempfile.gettempdir()).mpl


def run_task(config: AblationConfig, task: str, output_dir: Optional[str],
             command: str = '', log: Callable[[str], None] = print
             ) -> Dict[str, Any]:
  """Every variant of `config.variants` over the task's seeds."""
  start = time.time()
  configs = grid(_base_mpl(config, task), config.variants)
  if task == 'two_moon':
    seeds, networks = config.two_moon_seeds, ('student', 'teacher')
    run_one = lambda mpl, seed: run_two_moon_variant(config, mpl, seed)
    setup = dataclasses.asdict(config.two_moon)
  elif task == 'digits':
    seeds, networks = config.image_seeds, tuple(IMAGE_NETWORKS)
    run_one = lambda mpl, seed: run_image_variant(config, mpl, seed)
    setup = image_config(config, '<temporary>').to_dict()
  else:
    raise ValueError(f'Unknown task {task!r}; choose from {", ".join(TASKS)}.')
  payload = {'task': task, 'command': command, 'setup': setup,
             'base_fields': BASE_FIELDS, 'variants': {}}
  path = (os.path.join(output_dir, 'results', f'ablation_{task}.json')
          if output_dir else None)
  for variant, mpl in configs.items():
    rows = []
    for seed in range(seeds):
      run_start = time.time()
      rows.append(run_one(mpl, seed))
      log(f'{task} {variant} seed {seed}: ' + ', '.join(
          f'{n} {rows[-1][n]:.4f}' for n in networks) +
          f' ({time.time() - run_start:.1f} s)')
    payload['variants'][variant] = {
        'changed': VARIANTS[variant], 'mpl_config': dataclasses.asdict(mpl),
        'test_accuracy': {n: _summary([r[n] for r in rows])
                          for n in networks},
        'runs': rows}
    payload['seconds'] = time.time() - start
    if path:
      storage.write_json(path, payload)
  log(f'{task}: {len(configs)} variants x {seeds} seeds in '
      f'{payload["seconds"]:.0f} s' + (f'; wrote {path}' if path else ''))
  for variant, entry in payload['variants'].items():
    log(f'  {variant:<14}' + '  '.join(
        f'{n} {entry["test_accuracy"][n]["mean"]:.4f} +- '
        f'{entry["test_accuracy"][n]["std"]:.4f}' for n in networks))
  return payload


def run(config: AblationConfig, output_dir: Optional[str],
        command: str = '') -> Dict[str, Dict[str, Any]]:
  config.check()
  return {task: run_task(config, task, output_dir, command)
          for task in config.tasks}
