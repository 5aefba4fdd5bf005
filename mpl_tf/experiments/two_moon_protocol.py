"""TwoMoon with Algorithm 1 (MPL on a UDA teacher), its control, fairly tuned.

    python experiment.py two_moon --output_dir=docs

Methods (all on the same seeds, data, labeled points and initial weights):
  supervised             the network on the 6 labeled points.
  pseudo_labels          MplStep, mpl_weight=0, uda_weight=0: a teacher on
                         the labels alone teaches the student.
  mpl                    MplStep, mpl_weight=1, uda_weight=0: the feedback
                         without UDA (the previous TwoMoon row).
  uda                    MplStep, mpl_weight=0, uda_weight>0: the control.
                         The teacher gets UDA, no feedback; the student still
                         learns from its sampled labels.
  uda_mpl                MplStep with UDA and the feedback: Algorithm 1
                         (sampled labels, exact h, the paper's sign).
  uda_mpl_taylor         the same with the released code's Taylor h.
  uda_mpl_released_sign  the same with the released code's sign of h.
  fully_supervised       the network on all 2,000 training labels: the
                         ceiling.
uda_mpl against uda is the feedback's effect with UDA; uda against
pseudo_labels is UDA's.

The protocol, the same for every method:
  1. Grid: every method gets the same number of rate settings, 9 (teacher x
     student peak rates, 3 x 3; the supervised models: 9 rates), the UDA
     rows each of those for every augmentation noise in `noise_grid`; every
     setting at every step count in `step_counts`.
  2. Selection: by mean validation accuracy (a separate make_moons draw per
     seed) over the tuning seeds, which are disjoint from the evaluation
     seeds. Ties go to fewer steps, then to the earlier grid point.
  3. Report: the selected setting retrained on each evaluation seed; test
     accuracy (another separate draw) as mean +- std, and how many seeds
     reach 99% and 95%.
Whether the step counts are long enough: `best_validation_by_steps` holds
each method's best mean validation accuracy at every step count, and
`convergence` the selected setting's at `convergence_factor` times the
longest (not better there: converged).
"""

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from mpl_tf import storage
from mpl_tf.config import ConfigError, MplConfig
from mpl_tf.experiments import checks
from mpl_tf.experiments import two_moon as two_moon_lib
from mpl_tf.experiments import two_moon_trainers as trainers
from mpl_tf.experiments.two_moon import TwoMoonConfig

# Offset between a seed's training draw and its validation draw.
_VALIDATION_SEED_OFFSET = 200_000


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  title: str
  kind: str                      # 'mpl' (MplStep) or 'supervised'
  mpl: Tuple[Tuple[str, Any], ...] = ()   # MplConfig fields of the method
  noise: bool = False            # tuned over the augmentation noise (UDA)
  all_labels: bool = False       # trained on every training label


METHODS = (
    Method('supervised', 'Supervised', 'supervised'),
    Method('pseudo_labels', 'Pseudo Labels', 'mpl',
           (('mpl_weight', 0.0), ('uda_weight', 0.0))),
    Method('mpl', 'MPL without UDA', 'mpl',
           (('mpl_weight', 1.0), ('uda_weight', 0.0))),
    Method('uda', 'UDA only (control)', 'mpl', (('mpl_weight', 0.0),), True),
    Method('uda_mpl', 'UDA + MPL (Algorithm 1)', 'mpl', (('mpl_weight', 1.0),),
           True),
    Method('uda_mpl_taylor', 'UDA + MPL, Taylor h', 'mpl',
           (('mpl_weight', 1.0), ('feedback', 'taylor')), True),
    Method('uda_mpl_released_sign', "UDA + MPL, released code's sign of h",
           'mpl', (('mpl_weight', 1.0), ('feedback_sign', 'released_code')),
           True),
    Method('fully_supervised', 'Supervised on all 2,000 labels (ceiling)',
           'supervised', all_labels=True),
)
METHOD_NAMES = tuple(method.name for method in METHODS)
FIGURE_METHODS = ('supervised', 'pseudo_labels', 'mpl', 'uda', 'uda_mpl')


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
  """The protocol's grids and seeds; flags/experiment_flags.py fills it."""
  two_moon: TwoMoonConfig = TwoMoonConfig()
  validation_points: int = 2000
  # Peak rates of teacher and student (3 x 3 = 9 settings) ...
  rate_grid: Tuple[float, ...] = (0.1, 0.5, 2.0)
  # ... and the supervised models' 9 (the same number of settings).
  supervised_rate_grid: Tuple[float, ...] = (
      0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.0, 3.5, 5.0)
  # Std of the Gaussian noise that makes a point's augmented view (UDA rows).
  noise_grid: Tuple[float, ...] = (0.05, 0.1, 0.2)
  step_counts: Tuple[int, ...] = (1000, 3000, 9000)
  # The teacher's UDA loss (the library's): chosen for 2-D points by the UDA
  # control's mean validation accuracy on the tuning seeds (docs/results.md;
  # the image defaults, weight 1 and temperature 0.7, gave 0.84 there).
  uda_weight: float = 4.0
  uda_temperature: float = 0.4
  uda_threshold: float = 0.6
  # The convergence check: the selected setting is also trained this many
  # times longer than the longest step count, on the tuning seeds.
  convergence_factor: int = 2
  tuning_seeds: int = 4
  first_tuning_seed: int = 100
  eval_seeds: int = 10
  first_eval_seed: int = 0
  figure_seed: int = 0
  methods: Tuple[str, ...] = METHOD_NAMES
  # XLA compiles each trainer's whole loop: ~10x faster for these networks.
  jit_compile: bool = True
  # Methods run in this many processes at once (one per core).
  processes: int = 2

  def check(self) -> None:
    """Refuses what would train on nothing or report something wrong.

    Counts and grids first, so a zero count is named itself (not as the
    figure seed it leaves outside the evaluation seeds); checks.py says why.
    """
    self.two_moon.check()
    defaults = ProtocolConfig()
    checks.at_least('validation_points', self.validation_points, 2,
                    "points of each seed's validation draw, one per class at "
                    'least')
    checks.numbers('rate_grid', self.rate_grid, 0, defaults.rate_grid,
                   strictly=True)
    checks.numbers('supervised_rate_grid', self.supervised_rate_grid, 0,
                   defaults.supervised_rate_grid, strictly=True)
    if len(self.supervised_rate_grid) != len(self.rate_grid) ** 2:
      raise ConfigError(
          f'--supervised_rate_grid has {len(self.supervised_rate_grid)} rates'
          f' and --rate_grid {len(self.rate_grid)}: every method gets the '
          f'same number of rate settings, so pass {len(self.rate_grid) ** 2}.')
    checks.numbers('noise_grid', self.noise_grid, 0, defaults.noise_grid)
    checks.numbers('step_counts', self.step_counts, 1, defaults.step_counts)
    checks.positive('uda_weight', self.uda_weight,
                    "weight of the teacher's UDA loss in the UDA methods")
    checks.positive('uda_temperature', self.uda_temperature,
                    'sharpening temperature of the UDA target')
    checks.below_one('uda_threshold', self.uda_threshold,
                     'confidence threshold of the UDA mask')
    checks.at_least('convergence_factor', self.convergence_factor, 2,
                    'the selected setting is retrained this many times the '
                    'longest step count; 1 would repeat it')
    checks.at_least('tuning_seeds', self.tuning_seeds, 1, 'seeds whose '
                    "validation accuracy selects each method's setting")
    checks.at_least('eval_seeds', self.eval_seeds, 1,
                    'seeds the selected settings are reported on')
    checks.seeds('first_tuning_seed', self.first_tuning_seed,
                 self.tuning_seeds, _VALIDATION_SEED_OFFSET)
    checks.seeds('first_eval_seed', self.first_eval_seed, self.eval_seeds,
                 _VALIDATION_SEED_OFFSET)
    tuning = range(self.first_tuning_seed,
                   self.first_tuning_seed + self.tuning_seeds)
    evaluation = range(self.first_eval_seed,
                       self.first_eval_seed + self.eval_seeds)
    if max(tuning.start, evaluation.start) < min(tuning.stop, evaluation.stop):
      raise ConfigError(
          f'--first_tuning_seed={self.first_tuning_seed}, --tuning_seeds='
          f'{self.tuning_seeds}: the tuning seeds {tuning[0]}-{tuning[-1]} '
          f'overlap the evaluation seeds {evaluation[0]}-{evaluation[-1]}; '
          f'choose disjoint seeds.')
    if self.figure_seed not in evaluation:
      raise ConfigError(f'--figure_seed={self.figure_seed}: not an '
                        f'evaluation seed; pass one of {evaluation[0]}-'
                        f'{evaluation[-1]}.')
    checks.values('methods', self.methods, lambda m: m in METHOD_NAMES,
                  f'must be one of {", ".join(METHOD_NAMES)}', METHOD_NAMES)
    checks.at_least('processes', self.processes, 1,
                    'methods run in this many processes at once')


def method_mpl_config(config: ProtocolConfig, method: Method) -> MplConfig:
  """Algorithm 1's choices, the protocol's UDA loss, the method's fields."""
  fields = dict(pseudo_label='sampled', feedback='exact',
                feedback_sign='paper', label_smoothing=0.0, uda_steps=1,
                uda_weight=config.uda_weight,
                uda_temperature=config.uda_temperature,
                uda_threshold=config.uda_threshold)
  fields.update(dict(method.mpl))
  return MplConfig(**fields)


def settings(config: ProtocolConfig, method: Method) -> List[Dict[str, float]]:
  """The method's rate (and noise) grid, in a fixed order."""
  if method.kind == 'supervised':
    return [{'teacher_lr': rate} for rate in config.supervised_rate_grid]
  rates = [{'teacher_lr': t, 'student_lr': s}
           for t in config.rate_grid for s in config.rate_grid]
  if not method.noise:
    return rates
  return [dict(rate, noise_std=noise) for rate in rates
          for noise in config.noise_grid]


@dataclasses.dataclass
class SeedData:
  data: two_moon_lib.TwoMoonData
  x_validation: np.ndarray
  y_validation: np.ndarray


class Protocol:
  """Holds the trainers (one per method and step count) and the seeds' data."""

  def __init__(self, config: ProtocolConfig):
    config.check()
    self.config = config
    self._trainers, self._data = {}, {}

  def seed_data(self, seed: int) -> SeedData:
    if seed not in self._data:
      moons = self.config.two_moon
      x, y = two_moon_lib.make_moons(
          self.config.validation_points, moons.noise,
          seed + _VALIDATION_SEED_OFFSET)
      self._data[seed] = SeedData(two_moon_lib.make_data(moons, seed), x, y)
    return self._data[seed]

  def trainer(self, method: Method, num_steps: int):
    key = (method.name, num_steps)
    if key not in self._trainers:
      moons = self.config.two_moon
      if method.kind == 'mpl':
        self._trainers[key] = trainers.MplTrainer(
            moons, method_mpl_config(self.config, method), num_steps,
            self.config.jit_compile)
      else:
        points = (2 * (moons.labeled_per_class + moons.unlabeled_per_class)
                  if method.all_labels else 2 * moons.labeled_per_class)
        self._trainers[key] = trainers.SupervisedTrainer(
            moons, points, num_steps, self.config.jit_compile)
    return self._trainers[key]

  def train(self, method: Method, num_steps: int, setting: Dict[str, float],
            seed: int) -> Tuple[Any, Dict[str, float]]:
    """One run; returns (trainer, diagnostics): its models are the run's."""
    trainer = self.trainer(method, num_steps)
    data = self.seed_data(seed).data
    if method.kind == 'mpl':
      diagnostics = trainer.run(data, seed, setting['teacher_lr'],
                                setting['student_lr'],
                                setting.get('noise_std', 0.0))
    else:
      if method.all_labels:
        x = np.concatenate([data.x_labeled, data.x_unlabeled])
        y = np.concatenate([data.y_labeled, data.y_unlabeled])
      else:
        x, y = data.x_labeled, data.y_labeled
      diagnostics = trainer.run(x, y, seed, setting['teacher_lr'])
    return trainer, diagnostics

  def validation_accuracy(self, trainer, seed: int) -> float:
    seed_data = self.seed_data(seed)
    return trainers.accuracy(trainer.models['student'],
                             seed_data.x_validation, seed_data.y_validation)

  def test_accuracies(self, trainer, seed: int) -> Dict[str, float]:
    data = self.seed_data(seed).data
    return {name: trainers.accuracy(model, data.x_test, data.y_test)
            for name, model in trainer.models.items()}


def tune(protocol: Protocol, method: Method, log) -> Dict[str, Any]:
  """Every setting at every step count on the tuning seeds; the best one."""
  config = protocol.config
  seeds = list(range(config.first_tuning_seed,
                     config.first_tuning_seed + config.tuning_seeds))
  rows = []
  for num_steps in sorted(config.step_counts):
    for setting in settings(config, method):
      accuracies = []
      for seed in seeds:
        trainer, _ = protocol.train(method, num_steps, setting, seed)
        accuracies.append(protocol.validation_accuracy(trainer, seed))
      rows.append({'num_steps': num_steps, 'setting': setting,
                   'validation': float(np.mean(accuracies))})
  best = max(rows, key=lambda row: row['validation'])   # first of equals
  by_steps = {str(steps): max(r['validation'] for r in rows
                              if r['num_steps'] == steps)
              for steps in sorted(config.step_counts)}
  # Long enough? The selected setting, trained convergence_factor times
  # longer than the longest step count: not better means converged.
  longer = config.convergence_factor * max(config.step_counts)
  longer_accuracies = []
  for seed in seeds:
    trainer, _ = protocol.train(method, longer, best['setting'], seed)
    longer_accuracies.append(protocol.validation_accuracy(trainer, seed))
  convergence = {'num_steps': longer,
                 'validation': float(np.mean(longer_accuracies))}
  log(f'{method.name:<22} tuned: {best["setting"]} at {best["num_steps"]} '
      f'steps, validation {best["validation"]:.4f}; best by steps {by_steps}'
      f'; at {longer} steps {convergence["validation"]:.4f}')
  return {'seeds': seeds, 'grid': rows, 'selected': best,
          'best_validation_by_steps': by_steps, 'convergence': convergence}


def evaluate(protocol: Protocol, method: Method, selected: Dict[str, Any],
             on_figure_seed: Callable) -> Dict[str, Any]:
  """The selected setting on every evaluation seed: test accuracies."""
  config = protocol.config
  rows = []
  for seed in range(config.first_eval_seed,
                    config.first_eval_seed + config.eval_seeds):
    trainer, diagnostics = protocol.train(method, selected['num_steps'],
                                          selected['setting'], seed)
    test = protocol.test_accuracies(trainer, seed)
    rows.append({'seed': seed, 'test': test['student'],
                 'teacher_test': test.get('teacher'), **diagnostics})
    if seed == config.figure_seed:
      on_figure_seed(method, trainer, test['student'])
  accuracies = [row['test'] for row in rows]
  summary = {**two_moon_lib.mean_std(accuracies),
             'seeds_at_99': sum(a >= 0.99 for a in accuracies),
             'seeds_at_95': sum(a >= 0.95 for a in accuracies)}
  if method.kind == 'mpl':
    summary['teacher'] = two_moon_lib.mean_std(
        [row['teacher_test'] for row in rows])
    for key in ('h_mean_abs', 'h_positive_fraction', 'uda_mask_rate'):
      summary[key] = float(np.mean([row[key] for row in rows]))
  return {'summary': summary, 'runs': rows}


def run_method(config: ProtocolConfig, name: str, log=print
               ) -> Tuple[Dict[str, Any], Optional[two_moon_lib.Panel]]:
  """Tunes and evaluates one method; its figure panel if it has one."""
  method = next(m for m in METHODS if m.name == name)
  protocol = Protocol(config)
  panel = []
  figure_data = protocol.seed_data(config.figure_seed).data
  grid_points, grid_shape = two_moon_lib.figure_grid(figure_data)

  def on_figure_seed(method, trainer, accuracy):
    if method.name in FIGURE_METHODS:
      panel.append(two_moon_lib.Panel(
          method.title, accuracy, trainers.probabilities(
              trainer.models['student'], grid_points).reshape(grid_shape)))

  start = time.time()
  tuning = tune(protocol, method, log)
  evaluation = evaluate(protocol, method, tuning['selected'], on_figure_seed)
  summary = evaluation['summary']
  log(f'{method.name:<22} test {summary["mean"]:.4f} +- '
      f'{summary["std"]:.4f}; >= 99%: {summary["seeds_at_99"]}, >= 95%: '
      f'{summary["seeds_at_95"]} of {summary["n"]} '
      f'({time.time() - start:.0f} s)')
  result = {'title': method.title, 'tuning': tuning, **evaluation,
            'seconds': time.time() - start}
  return result, (panel[0] if panel else None)


def _run_method_quietly(config: ProtocolConfig, name: str):
  """run_method in a worker process (its log lines flushed as they come)."""
  return run_method(config, name, log=lambda line: print(line, flush=True))


def _run_methods(config: ProtocolConfig, log) -> Dict[str, Any]:
  """Every method, in `config.processes` processes, longest first."""
  names = [m.name for m in METHODS if m.name in config.methods]
  if config.processes <= 1:
    return {name: run_method(config, name, log) for name in names}
  import multiprocessing  # pylint: disable=g-import-not-at-top
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  # The UDA rows have 3x the settings: they go out first.
  longest_first = sorted(names, key=lambda n: not next(
      m for m in METHODS if m.name == n).noise)
  context = multiprocessing.get_context('spawn')   # no forked TF runtime
  with futures.ProcessPoolExecutor(config.processes,
                                   mp_context=context) as pool:
    jobs = {name: pool.submit(_run_method_quietly, config, name)
            for name in longest_first}
    return {name: jobs[name].result() for name in names}


def run(config: ProtocolConfig, output_dir: Optional[str] = None,
        command: str = '', log=print) -> Dict[str, Any]:
  """Tunes and evaluates every method; writes the JSON and the figure."""
  config.check()
  start = time.time()
  outcomes = _run_methods(config, log)
  results = {name: result for name, (result, _) in outcomes.items()}
  panels = [panel for _, panel in outcomes.values() if panel is not None]
  payload = {'command': command, 'config': dataclasses.asdict(config),
             'methods': results, 'seconds': time.time() - start}
  if output_dir:
    # The JSON first: a figure that cannot be drawn loses no measurement.
    json_path = f'{output_dir}/results/two_moon.json'
    payload['seconds'] = time.time() - start
    storage.write_json(json_path, payload)
    log(f'wrote {json_path}')
    if panels:   # none when --methods holds no method of FIGURE_METHODS
      figure_path = f'{output_dir}/figures/two_moon.png'
      moons = config.two_moon
      two_moon_lib.plot_panels(
          two_moon_lib.make_data(moons, config.figure_seed), panels,
          figure_path, f'TwoMoon, seed {config.figure_seed}: '
          f'{2 * moons.labeled_per_class} labeled + '
          f'{2 * moons.unlabeled_per_class:,} unlabeled points, each method '
          f'at its tuned setting')
      log(f'wrote {figure_path}')
  log(f'total {payload["seconds"]:.0f} s')
  return payload
