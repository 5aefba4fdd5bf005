"""Runs an experiment of docs/results.md: `python experiment.py NAME --flags`.

The command line of mpl_tf/experiments, kept thin like main.py and
prepare.py: NAME's flags (flags/experiment_flags.py) -> its frozen config ->
the library's run, which writes `<output_dir>/results/*.json` (and
figures/; by default under runs/experiments/NAME, never docs/ unless named).
The command line it was given is recorded in the JSON and heads the table
`python experiment.py report --output_dir=...` renders from it. An unknown
experiment or bad flags end with one message on stderr and exit status 2,
without a traceback.
"""

import os
import sys
from typing import Callable, Dict, Sequence, Tuple

# TensorFlow's C++ start-up lines (CUDA probing, CPU feature notes), as in
# prepare.py; a user's own TF_CPP_MIN_LOG_LEVEL wins.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# Before TensorFlow starts its threads or allocates, as main.py does
# (mpl_tf/malloc_tuning.py says why).
from mpl_tf import malloc_tuning  # pylint: disable=g-import-not-at-top

malloc_tuning.tune()

from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top

from flags import experiment_flags  # pylint: disable=g-import-not-at-top
from mpl_tf.experiments import ablation  # pylint: disable=g-import-not-at-top
from mpl_tf.experiments import report  # pylint: disable=g-import-not-at-top
from mpl_tf.experiments import two_moon_protocol  # pylint: disable=g-import-not-at-top
from mpl_tf.experiments import two_moon_tuning  # pylint: disable=g-import-not-at-top

_USAGE = """\
Runs an experiment of docs/results.md and writes its JSON under
--output_dir (results/, figures/; by default runs/experiments/NAME, docs/
only when named, as here to refresh docs/results.md); `report` renders the
tables of --output_dir's results.md.

  python experiment.py two_moon --output_dir=docs
  python experiment.py two_moon_tuning --output_dir=docs
  python experiment.py ablation --output_dir=docs --ablation_tasks=two_moon
  python experiment.py report --output_dir=docs

Experiments:
"""


def _two_moon(flag_values, command: str) -> None:
  config, output_dir = experiment_flags.two_moon_protocol_config(flag_values)
  two_moon_protocol.run(config, output_dir, command=command)


def _two_moon_tuning(flag_values, command: str) -> None:
  base, num_seeds, output_dir = experiment_flags.two_moon_tuning_config(
      flag_values)
  two_moon_tuning.run(base, num_seeds, output_dir, command=command)


def _ablation(flag_values, command: str) -> None:
  config, output_dir = experiment_flags.ablation_config(flag_values)
  ablation.run(config, output_dir, command=command)


def _report(flag_values, command: str) -> None:
  del command   # the tables are headed by the commands that wrote the JSON
  report.update(experiment_flags.report_output_dir(flag_values))


# name: (what it does, its flags' definer, flags -> run).
_EXPERIMENTS: Dict[str, Tuple[str, Callable, Callable]] = {
    'two_moon': ('TwoMoon (paper 3.1, Figure 2): every method tuned alike.',
                 experiment_flags.define_two_moon_protocol, _two_moon),
    'two_moon_tuning': ('A grid over what sets the feedback\'s strength on '
                        'TwoMoon.', experiment_flags.define_two_moon_tuning,
                        _two_moon_tuning),
    'ablation': ('Each disputed MPL choice varied alone: TwoMoon, digits.',
                 experiment_flags.define_ablation, _ablation),
    'report': ('Renders results.md\'s tables from results/*.json.',
               experiment_flags.define_report, _report),
}
_HELP = ('-h', '--help', '-help', '--helpfull')


def _usage() -> str:
  return (_USAGE + ''.join(f'  {name:<16} {about}\n' for name, (about, _, _)
                           in _EXPERIMENTS.items()) +
          '\n`python experiment.py NAME --help` lists the flags of NAME.')


def run_cli(argv: Sequence[str]) -> int:
  """The command line: parses argv, runs one experiment; the exit status.

  0 on success; 2, with one message on stderr and no traceback, for an
  unknown experiment or bad flags.
  """
  if len(argv) < 2 or argv[1] in _HELP:
    print(_usage(), file=sys.stdout if len(argv) > 1 else sys.stderr)
    return 0 if len(argv) > 1 else 2
  name = argv[1]
  if name not in _EXPERIMENTS:
    print(f'error: unknown experiment {name!r}; choose from '
          f'{", ".join(_EXPERIMENTS)} (python experiment.py --help).',
          file=sys.stderr)
    return 2
  _, define, run = _EXPERIMENTS[name]
  flag_values = absl_flags.FlagValues()
  define(flag_values)
  if any(arg in _HELP for arg in argv[2:]):
    print(f'python experiment.py {name}: {_EXPERIMENTS[name][0]}\n\n' +
          flag_values.get_help())
    return 0
  try:
    leftover = flag_values([f'experiment.py {name}', *argv[2:]])
    if len(leftover) > 1:
      raise absl_flags.Error(f'unexpected arguments: {" ".join(leftover[1:])}')
    run(flag_values, ' '.join(['python experiment.py', *argv[1:]]))
  except absl_flags.Error as error:
    print(f'error: {error}\nRun `python experiment.py {name} --help` to list '
          f'the flags.', file=sys.stderr)
    return 2
  except (ValueError, FileNotFoundError) as error:
    # The readers' ConfigError (a ValueError), and what the digits runs'
    # training path raises naming the fix, as in main.py.
    print(f'error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(run_cli(sys.argv))
