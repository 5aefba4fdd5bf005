"""Writes the results tables of docs/results.md from docs/results/*.json.

    python experiment.py report --output_dir=docs

Every table in docs/results.md sits between the markers
`<!-- generated: NAME -->` and `<!-- end generated: NAME -->`; this command
replaces what is between them with the table rendered from
`<output_dir>/results/NAME.json` (written by two_moon.py, two_moon_tuning.py
and ablation.py), headed by the command that produced the JSON. The prose
around the tables is written by hand; the numbers are not. A marker whose
JSON does not exist is left as it is and reported.
"""

import json
import os
import re
from typing import Callable, Dict, List

import tensorflow as tf

_BLOCK = re.compile(r'(<!-- generated: (?P<name>[\w]+) -->\n)(.*?)'
                    r'(<!-- end generated: (?P=name) -->)', re.DOTALL)


def _mean_std(entry: Dict[str, float]) -> str:
  return f'{entry["mean"]:.3f} ± {entry["std"]:.3f}'


def _header(payload: Dict, default_command: str) -> List[str]:
  command = payload.get('command') or default_command
  seconds = payload.get('seconds')
  timing = f' ({seconds:.0f} s)' if seconds else ''
  return [f'`{command}`{timing}', '']


def _setting(setting: Dict[str, float]) -> str:
  names = {'teacher_lr': 'lr_T', 'student_lr': 'lr_S', 'noise_std': 'noise'}
  return ', '.join(f'{names[k]} {setting[k]:g}' for k in names
                   if k in setting)


def two_moon(payload: Dict) -> List[str]:
  """The protocol's table: each method at its selected setting."""
  config = payload['config']
  lines = _header(payload, 'python experiment.py two_moon --output_dir=docs')
  first_eval, first_tuning = (config['first_eval_seed'],
                              config['first_tuning_seed'])
  lines += [
      f'Selection on seeds {first_tuning}-'
      f'{first_tuning + config["tuning_seeds"] - 1} (validation), report on '
      f'seeds {first_eval}-{first_eval + config["eval_seeds"] - 1} (test); '
      f'step counts {config["step_counts"]}; UDA weight '
      f'{config["uda_weight"]:g}, temperature {config["uda_temperature"]:g},'
      f' threshold {config["uda_threshold"]:g}.', '',
      '| method | selected (steps, rates, noise) | validation (tuning) | '
      f'validation at {config["convergence_factor"]}x steps | test accuracy '
      '| seeds ≥ 99% | seeds ≥ 95% | MPL teacher | mean abs(h) |',
      '|---|---|---|---|---|---|---|---|---|']
  # The protocol's order (the JSON's keys are sorted).
  from mpl_tf.experiments.two_moon_protocol import METHOD_NAMES  # pylint: disable=g-import-not-at-top
  order = [n for n in METHOD_NAMES if n in payload['methods']]
  for name in order:
    result = payload['methods'][name]
    tuning, summary = result['tuning'], result['summary']
    selected = tuning['selected']
    teacher = (_mean_std(summary['teacher']) if 'teacher' in summary
               else '')
    h = (f'{summary["h_mean_abs"]:.2g}' if 'mpl' in name and
         summary.get('h_mean_abs') is not None else '')
    lines.append(
        f'| {result["title"]} | {selected["num_steps"]}, '
        f'{_setting(selected["setting"])} | {selected["validation"]:.4f} | '
        f'{tuning["convergence"]["validation"]:.4f} | {_mean_std(summary)} '
        f'| {summary["seeds_at_99"]} / {summary["n"]} | '
        f'{summary["seeds_at_95"]} / {summary["n"]} | {teacher} | {h} |')
  gaps = _paired_gaps(payload['methods'])
  if gaps:
    lines.append('')
    lines += gaps
  return lines


def _paired_gaps(methods: Dict) -> List[str]:
  """Per-seed test differences of the pairs that isolate one term."""
  pairs = (('uda_mpl', 'uda', 'the feedback, with UDA'),
           ('mpl', 'pseudo_labels', 'the feedback, without UDA'),
           ('uda', 'pseudo_labels', 'UDA'))
  lines = []
  for treated, control, effect in pairs:
    if treated in methods and control in methods:
      a = {r['seed']: r['test'] for r in methods[treated]['runs']}
      b = {r['seed']: r['test'] for r in methods[control]['runs']}
      gaps = [a[seed] - b[seed] for seed in a if seed in b]
      if not gaps:
        continue
      mean = sum(gaps) / len(gaps)
      wins = sum(g > 0 for g in gaps)
      losses = sum(g < 0 for g in gaps)
      lines.append(f'- {methods[treated]["title"]} − '
                   f'{methods[control]["title"]} ({effect}): mean '
                   f'{mean:+.4f} per seed, better on {wins}, worse on '
                   f'{losses} of {len(gaps)} seeds (each at its own tuned '
                   f'setting).')
  return lines


def two_moon_tuning(payload: Dict) -> List[str]:
  lines = _header(payload, '')
  lines += [f'Seeds {payload["seeds"]}; each row: Pseudo Labels and MPL on '
            'the same data and initial weights.', '',
            '| setting | Pseudo Labels | MPL student | MPL teacher | '
            'MPL − PL | MPL wins / losses (> 1 test point) | mean abs(h) | '
            'h > 0 |',
            '|---|---|---|---|---|---|---|---|']
  for row in payload['settings']:
    lines.append(
        f'| {row["name"]} | {row["pseudo_labels"]:.4f} | '
        f'{row["mpl_student"]:.4f} | {row["mpl_teacher"]:.4f} | '
        f'{row["mean_gap"]:+.4f} | {row["mpl_wins"]} / {row["mpl_losses"]} | '
        f'{row["h_mean_abs"]:.2g} | {row["h_positive_fraction"]:.0%} |')
  return lines


def ablation(payload: Dict) -> List[str]:
  variants = payload['variants']
  networks = list(next(iter(variants.values()))['test_accuracy'])
  reference = variants.get('mpl_weight_0')
  lines = _header(payload, '')
  lines += ['| variant | ' + ' | '.join(networks) +
            (f' | {networks[0]} − mpl_weight_0' if reference else '') +
            ' | seeds |',
            '|---|' + '---|' * (len(networks) + 1 + bool(reference))]
  for variant, entry in variants.items():
    accuracy = entry['test_accuracy']
    cells = [_mean_std(accuracy[n]) for n in networks]
    if reference:
      gap = accuracy[networks[0]]['mean'] - reference['test_accuracy'][
          networks[0]]['mean']
      cells.append(f'{gap:+.3f}')
    lines.append(f'| {variant} | ' + ' | '.join(cells) +
                 f' | {accuracy[networks[0]]["n"]} |')
  return lines


RENDERERS: Dict[str, Callable[[Dict], List[str]]] = {
    'two_moon': two_moon, 'two_moon_tuning': two_moon_tuning,
    'ablation_two_moon': ablation, 'ablation_digits': ablation}


def render(text: str, results_dir: str, log=print) -> str:
  """`text` with every generated block re-rendered from its JSON."""

  def replace(match):
    name = match.group('name')
    path = os.path.join(results_dir, f'{name}.json')
    if name not in RENDERERS or not tf.io.gfile.exists(path):
      log(f'left {name} as it is: no renderer or no {path}')
      return match.group(0)
    with tf.io.gfile.GFile(path) as f:
      body = '\n'.join(RENDERERS[name](json.loads(f.read())))
    log(f'rendered {name} from {path}')
    return match.group(1) + body + '\n' + match.group(4)

  return _BLOCK.sub(replace, text)


def update(output_dir: str) -> None:
  """Re-renders `<output_dir>/results.md`'s tables from its results/*.json."""
  path = os.path.join(output_dir, 'results.md')
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f'no {path}: --output_dir is the directory '
                            f'holding results.md and results/ (e.g. docs).')
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write(render(text, os.path.join(output_dir, 'results')))
