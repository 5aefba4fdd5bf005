"""Flags of the experiment commands (mpl_tf/experiments), and their one reader.

    python experiment.py two_moon --output_dir=docs
    python experiment.py ablation --output_dir=docs
    python experiment.py two_moon_tuning --output_dir=docs
    python experiment.py report --output_dir=docs

`define_two_moon` / `define_ablation` declare the flags; `two_moon_config` /
`ablation_config` read them once into the experiments' frozen dataclasses.
Defaults come from those dataclasses, so a flag and its field cannot
disagree. A command defines only the flags it reads: one that its grid or
variants would override is refused as unknown, not silently ignored. The
ablation command takes the TwoMoon flags of its two_moon task's setup, and
the --image_* flags, from which
`image_base_config` reads its digits runs' base Config with
flags/definitions.py, the training flags.

Without --output_dir a command writes under runs/experiments/NAME (never
docs/: the commands above name it to refresh docs/results.md); report has
no default, since it rewrites a results.md in place.
"""

import dataclasses
import os
from typing import Optional, Sequence, Tuple

from absl import flags as absl_flags

from flags import definitions
from mpl_tf import config as config_lib
from mpl_tf import storage
from mpl_tf.experiments import ablation
from mpl_tf.experiments import checks
from mpl_tf.experiments import two_moon
from mpl_tf.experiments import two_moon_protocol
from mpl_tf.experiments import two_moon_tuning

_TWO_MOON = two_moon.TwoMoonConfig()
_ABLATION = ablation.AblationConfig()

_TWO_MOON_HELP = {
    'noise': 'Std of the Gaussian noise of sklearn make_moons.',
    'labeled_per_class': 'Labeled points per class (paper: 3).',
    'unlabeled_per_class': 'Unlabeled points per class (paper: 997).',
    'test_points': 'Held-out test points (drawn like the training points).',
    'hidden_units': 'Units of each of the two sigmoid layers (paper: 8).',
    'num_steps': 'Training steps of every method.',
    'mpl_weight': 'Weight of the MPL term h * CE(y_hat, T(x_u)) of the MPL '
                  'run (Algorithm 1: 1).',
    'teacher_lr': 'Peak rate (cosine decay) of the teacher and of the '
                  'supervised model.',
    'student_lr': 'Peak rate (cosine decay) of the student.',
    'momentum': 'Nesterov momentum of every optimizer (0 = plain SGD).',
    'unlabeled_batch': 'Unlabeled points per step (0 = all of them).',
    'first_seed': 'First seed (data draw, labeled points, initial weights).',
}
_TWO_MOON_ENUMS = {
    'pseudo_label': (config_lib.PSEUDO_LABELS, 'Pseudo labels of the MPL run.'),
    'feedback': (config_lib.FEEDBACKS, 'Feedback h of the MPL run.'),
    'feedback_sign': (config_lib.FEEDBACK_SIGNS, 'Sign of h of the MPL run.'),
}
_ALL_TWO_MOON_FIELDS = tuple(_TWO_MOON_HELP) + tuple(_TWO_MOON_ENUMS)
# The TwoMoonConfig fields each command reads; the others are no flags of
# it, so a value it would override or never read is refused as unknown.
# two_moon_tuning: every setting sets num_steps, student_lr, mpl_weight and
# unlabeled_batch; the seeds are --tuning_seeds from --first_seed.
_TUNING_TWO_MOON_FIELDS = ('noise', 'labeled_per_class', 'unlabeled_per_class',
                           'test_points', 'hidden_units', 'teacher_lr',
                           'momentum', 'first_seed', 'pseudo_label',
                           'feedback', 'feedback_sign')
# ablation: the variants set the MPL choices and mpl_weight; the seeds are
# 0 .. --two_moon_seeds-1.
_ABLATION_TWO_MOON_FIELDS = ('noise', 'labeled_per_class',
                             'unlabeled_per_class', 'test_points',
                             'hidden_units', 'num_steps', 'teacher_lr',
                             'student_lr', 'momentum', 'unlabeled_batch')
_ABLATION_HELP = {
    'two_moon_seeds': 'Seeds per variant of the two_moon task.',
    'image_seeds': 'Seeds per variant of the digits task.',
}
# The digits runs' flags: {field: (default, help)}; with --image_flags they
# make the runs' base Config (image_base_config).
_IMAGE_FLAGS = {
    'image_steps': (300, 'Training steps of every digits run.'),
    'image_model': ('wrn-10-1', 'Network of the digits runs (teacher and '
                    'student).'),
    'image_data_dir': ('data/digits', 'Where the digits splits are prepared '
                       '(automatically).'),
}
# The digits runs: the README demo's recipe (flags/demo.cfg) made small:
# WRN-10-1, 10 labels per class, B=8, mu=3, UDA teacher, EMA student, no
# supervised baseline, one device loop, evaluated once at the end.
IMAGE_ARGS = (
    '--dataset=digits', '--labeled_per_class=10', '--num_validation=200',
    '--num_test=500', '--horizontal_flip=false', '--randaugment_magnitude=5',
    '--cutout_size=8', '--dropout_rate=0.2', '--labeled_batch_size=8',
    '--uda_ratio=3', '--teacher_lr=0.05', '--student_lr=0.05',
    '--weight_decay=0.0005', '--teacher_warmup_steps=30',
    '--student_warmup_steps=30', '--label_smoothing=0.1', '--uda_weight=2.0',
    '--uda_temperature=0.7', '--uda_threshold=0.6', '--uda_steps=100',
    '--ema_decay=0.95', '--eval_every=0', '--eval_median_last=1',
    '--nosupervised_baseline')


def _define_field(name, default, help_text, flag_values):
  define_fn = {bool: absl_flags.DEFINE_bool, int: absl_flags.DEFINE_integer,
               float: absl_flags.DEFINE_float,
               str: absl_flags.DEFINE_string}[type(default)]
  define_fn(name, default, help_text, flag_values=flag_values)


def output_dir_default(name: str) -> str:
  """Where experiment NAME writes without --output_dir: runs/ (git-ignored).

  Never docs/: the committed JSON and figure there are rewritten only by a
  command that names --output_dir=docs, so a trial run loses nothing.
  """
  return os.path.join('runs', 'experiments', name)


def _output_dir(flag_values) -> Optional[str]:
  """--output_dir, or None (write nothing); refused on ram:// (gone with the
  process) or where TensorFlow cannot reach it, before anything trains."""
  output_dir = flag_values['output_dir'].value or None
  if output_dir:
    storage.check_outlives_process(output_dir, 'output_dir')
    storage.check_reachable(output_dir, 'output_dir')
  return output_dir


def _define_output_dir(flag_values, name: str) -> None:
  if 'output_dir' not in flag_values:
    absl_flags.DEFINE_string(
        'output_dir', output_dir_default(name), 'Writes results/*.json (and '
        'figures/) under this directory (docs/results.md\'s are in docs); '
        'empty = write nothing.', flag_values=flag_values)


def define_two_moon(flag_values: absl_flags.FlagValues = absl_flags.FLAGS,
                    name: str = 'two_moon',
                    fields: Sequence[str] = _ALL_TWO_MOON_FIELDS) -> None:
  """Declares the TwoMoon flags of `fields`; `name`: the command."""
  _define_output_dir(flag_values, name)
  for field in fields:
    if field in _TWO_MOON_ENUMS:
      choices, help_text = _TWO_MOON_ENUMS[field]
      absl_flags.DEFINE_enum(field, getattr(_TWO_MOON, field), list(choices),
                             f'[two_moon] {help_text}',
                             flag_values=flag_values)
    else:
      _define_field(field, getattr(_TWO_MOON, field),
                    f'[two_moon] {_TWO_MOON_HELP[field]}', flag_values)


def two_moon_config(flag_values: absl_flags.FlagValues = absl_flags.FLAGS,
                    fields: Sequence[str] = _ALL_TWO_MOON_FIELDS
                    ) -> Tuple[two_moon.TwoMoonConfig, Optional[str]]:
  """(TwoMoonConfig, output_dir or None): `fields` from the flags, the
  others TwoMoonConfig's defaults."""
  config = dataclasses.replace(
      _TWO_MOON, **{field: flag_values[field].value for field in fields})
  return config, _output_dir(flag_values)


# TwoMoonConfig fields the protocol keeps fixed (the rates and step counts
# are its grids) and its own fields, with their help.
_PROTOCOL_TWO_MOON_FIELDS = ('noise', 'labeled_per_class', 'unlabeled_per_class',
                             'test_points', 'hidden_units', 'momentum',
                             'unlabeled_batch')
_PROTOCOL_HELP = {
    'validation_points': 'Points of each seed\'s validation draw (selection).',
    'rate_grid': 'Peak rates of teacher and student (all pairs).',
    'supervised_rate_grid': 'Peak rates of the supervised models '
                            '(len(rate_grid)**2 of them: the same number of '
                            'settings as every other method).',
    'noise_grid': 'Std of the Gaussian noise of the augmented view (UDA '
                  'methods).',
    'step_counts': 'Training step counts every method is tried at.',
    'uda_weight': 'Weight of the teacher\'s UDA loss in the UDA methods.',
    'uda_temperature': 'Sharpening temperature of the UDA target.',
    'uda_threshold': 'Confidence threshold of the UDA mask.',
    'convergence_factor': 'The selected setting is also trained this many '
                          'times the longest step count (convergence check).',
    'tuning_seeds': 'Seeds whose validation accuracy selects each method\'s '
                    'setting.',
    'first_tuning_seed': 'First tuning seed (disjoint from the evaluation '
                         'seeds).',
    'eval_seeds': 'Seeds the selected settings are reported on.',
    'first_eval_seed': 'First evaluation seed.',
    'figure_seed': 'The evaluation seed whose decision boundaries are drawn.',
    'methods': 'Methods to run.',
    'jit_compile': 'Compile each trainer\'s whole loop with XLA.',
    'processes': 'Methods run in this many processes at once.',
}


def define_two_moon_protocol(
    flag_values: absl_flags.FlagValues = absl_flags.FLAGS) -> None:
  """The protocol's flags (two_moon_protocol.ProtocolConfig)."""
  _define_output_dir(flag_values, 'two_moon')
  for field in _PROTOCOL_TWO_MOON_FIELDS:
    _define_field(field, getattr(_TWO_MOON, field),
                  f'[two_moon] {_TWO_MOON_HELP[field]}', flag_values)
  defaults = two_moon_protocol.ProtocolConfig()
  for field, help_text in _PROTOCOL_HELP.items():
    default = getattr(defaults, field)
    if isinstance(default, tuple):
      absl_flags.DEFINE_list(field, [str(v) for v in default],
                             f'[two_moon] {help_text}',
                             flag_values=flag_values)
    else:
      _define_field(field, default, f'[two_moon] {help_text}', flag_values)


def two_moon_protocol_config(
    flag_values: absl_flags.FlagValues = absl_flags.FLAGS):
  """(ProtocolConfig, output_dir or None) from the parsed flags."""
  defaults = two_moon_protocol.ProtocolConfig()
  fields = {}
  for field in _PROTOCOL_HELP:
    value = flag_values[field].value
    default = getattr(defaults, field)
    if isinstance(default, tuple):
      kind = type(default[0])
      try:
        value = tuple(kind(v) for v in value)
      except ValueError:
        raise config_lib.ConfigError(
            f'--{field}={",".join(value)}: a comma-separated list of '
            f'{kind.__name__} values.') from None
    fields[field] = value
  two_moon_cfg = dataclasses.replace(
      _TWO_MOON, **{f: flag_values[f].value for f in _PROTOCOL_TWO_MOON_FIELDS})
  config = two_moon_protocol.ProtocolConfig(two_moon=two_moon_cfg, **fields)
  config.check()   # before anything trains: every count, grid and seed
  return config, _output_dir(flag_values)


def define_two_moon_tuning(flag_values: absl_flags.FlagValues = absl_flags.FLAGS
                           ) -> None:
  """The TwoMoon flags (the base of every setting) and the seed count."""
  define_two_moon(flag_values, 'two_moon_tuning', _TUNING_TWO_MOON_FIELDS)
  absl_flags.DEFINE_integer('tuning_seeds', 4, '[two_moon_tuning] Seeds per '
                            'setting (each runs Pseudo Labels and MPL).',
                            flag_values=flag_values)


def two_moon_tuning_config(flag_values: absl_flags.FlagValues = absl_flags.FLAGS
                           ) -> Tuple[two_moon.TwoMoonConfig, int,
                                      Optional[str]]:
  """(base TwoMoonConfig, seeds per setting, output_dir or None)."""
  base, output_dir = two_moon_config(flag_values, _TUNING_TWO_MOON_FIELDS)
  seeds = flag_values['tuning_seeds'].value
  two_moon_tuning.check(base, seeds)   # every setting, before any trains
  return base, seeds, output_dir


def define_report(flag_values: absl_flags.FlagValues = absl_flags.FLAGS
                  ) -> None:
  """The report command's one flag: where results.md and results/ are.

  No default: report rewrites results.md in place, so the directory (docs
  for the committed one) is named on the command line.
  """
  absl_flags.DEFINE_string(
      'output_dir', '', 'The directory whose results.md is re-rendered from '
      'its results/*.json (required; docs: docs/results.md).',
      flag_values=flag_values)


def report_output_dir(flag_values: absl_flags.FlagValues = absl_flags.FLAGS
                      ) -> str:
  output_dir = _output_dir(flag_values)
  if not output_dir:
    raise config_lib.ConfigError(
        '--output_dir: the directory whose results.md is re-rendered from its '
        'results/*.json; pass --output_dir=docs for docs/results.md.')
  return output_dir


def define_ablation(flag_values: absl_flags.FlagValues = absl_flags.FLAGS
                    ) -> None:
  """Declares the ablation flags and, for its two_moon task, TwoMoon's."""
  define_two_moon(flag_values, 'ablation', _ABLATION_TWO_MOON_FIELDS)
  absl_flags.DEFINE_list('ablation_tasks', list(_ABLATION.tasks),
                         f'Tasks to run: {", ".join(ablation.TASKS)}.',
                         flag_values=flag_values)
  absl_flags.DEFINE_list('variants', list(_ABLATION.variants),
                         'Variants to run, each the base with one MplConfig '
                         f'field changed: {", ".join(ablation.VARIANTS)}.',
                         flag_values=flag_values)
  absl_flags.DEFINE_list('image_flags', [],
                         'Extra training flags of the digits runs '
                         '(flags/definitions.py), e.g. --num_test=300.',
                         flag_values=flag_values)
  for field, help_text in _ABLATION_HELP.items():
    _define_field(field, getattr(_ABLATION, field), f'[ablation] {help_text}',
                  flag_values)
  for field, (default, help_text) in _IMAGE_FLAGS.items():
    _define_field(field, default, f'[ablation] {help_text}', flag_values)


def image_base_config(steps: int, model: str, data_dir: str,
                      extra: Sequence[str] = ()) -> config_lib.Config:
  """The digits runs' base Config, read from flags like `main.py` reads them.

  IMAGE_ARGS, then the --image_* settings, then `extra` (the --image_flags,
  which win); the ablation gives every run its own model_dir and seed.
  """
  flag_values = absl_flags.FlagValues()
  definitions.define(flag_values)
  flag_values(['ablation', *IMAGE_ARGS, f'--model={model}',
               f'--data_dir={data_dir}', f'--num_steps={steps}',
               f'--steps_per_loop={steps}', f'--checkpoint_every={steps}',
               *extra])
  return definitions.to_config(flag_values)


def ablation_config(flag_values: absl_flags.FlagValues = absl_flags.FLAGS
                    ) -> Tuple[ablation.AblationConfig, Optional[str]]:
  """(AblationConfig, output_dir or None) from the parsed flags."""
  two_moon_cfg, output_dir = two_moon_config(flag_values,
                                             _ABLATION_TWO_MOON_FIELDS)
  tasks = tuple(flag_values['ablation_tasks'].value)
  # A flag, not a field: it sets the Config's num_steps, steps_per_loop and
  # checkpoint_every, whose own message would name none of them.
  checks.at_least('image_steps', flag_values['image_steps'].value, 1,
                  'training steps of every digits run')
  image = None
  if 'digits' in tasks:
    try:
      image = image_base_config(flag_values['image_steps'].value,
                                flag_values['image_model'].value,
                                flag_values['image_data_dir'].value,
                                flag_values['image_flags'].value)
    except absl_flags.Error as error:
      raise config_lib.ConfigError(
          f'--image_flags: {error}; they are training flags (python main.py '
          f'--helpfull).') from None
  config = ablation.AblationConfig(
      tasks=tasks, variants=tuple(flag_values['variants'].value),
      two_moon=two_moon_cfg, image=image,
      **{field: flag_values[field].value for field in _ABLATION_HELP})
  config.check()   # before anything trains: tasks, variants, every count
  return config, output_dir
