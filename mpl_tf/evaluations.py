"""Evaluations during and after training, and the final table.

`Evaluations` evaluates the selected network (the EMA student for MPL) on
validation, which alone selects (the best is kept in checkpoints/best), and
on test, which is only reported; with run.eval_all_networks it also
validates the teacher and the student for the curves. The history survives
restarts in model_dir/eval_history.json. `validation_curve` does the same
for the finetuning and supervised phases; `print_results` prints every
network on the same images.
"""

import os
from typing import Any, Callable, Dict, Optional

import keras
import tensorflow as tf

from mpl_tf import cluster
from mpl_tf import storage
from mpl_tf.config import Config
from mpl_tf.evaluate import Evaluator, evaluate_split, nonfinite_networks
from mpl_tf.phase import NonFiniteError

_HISTORY_FILE = 'eval_history.json'


class Evaluations:
  """Validation and test evaluations of the networks, and their history.

  The history (of the selected network, e.g. the EMA student) survives restarts
  in model_dir/eval_history.json; the best-on-validation network is kept in
  model_dir/checkpoints/best by its own CheckpointManager.
  """

  def __init__(self, config: Config, strategy, manifest, selected, directory,
               others: Optional[Dict[str, keras.Model]] = None):
    self.config, self.strategy, self.manifest = config, strategy, manifest
    self.evaluator = Evaluator(strategy)
    self.selected = selected
    # Validated too (run.eval_all_networks), for the curves alone.
    self.others = others if config.run.eval_all_networks else {}
    self.history_path = os.path.join(directory, _HISTORY_FILE)
    self.history = []
    self.best = cluster.Checkpoints(
        strategy, tf.train.Checkpoint(ema_student=selected),
        os.path.join(directory, 'checkpoints', 'best'), max_to_keep=1,
        checkpoint_name='best')
    self.writer = cluster.summary_writer(
        strategy, os.path.join(directory, 'logs', 'eval'))

  def load_history(self, restored_step: int) -> None:
    if tf.io.gfile.exists(self.history_path):
      self.history = [entry for entry in storage.read_json(self.history_path)
                      if entry['step'] <= restored_step]

  def has(self, step: int) -> bool:
    """Whether the history holds an evaluation of `step`."""
    return any(entry['step'] == step for entry in self.history)

  def evaluate(self, model: keras.Model, split: str) -> Dict[str, float]:
    return evaluate_split(self.evaluator, self.config, self.manifest, model,
                          split)

  def record(self, step: int) -> Dict[str, Any]:
    """Evaluates the selected network on both splits; keeps the best."""
    entry = {'step': step,
             'validation': self.evaluate(self.selected, 'validation'),
             'test': self.evaluate(self.selected, 'test')}
    others = {name: self.evaluate(model, 'validation')['top1']
              for name, model in self.others.items()}
    best_so_far = max((e['validation']['top1'] for e in self.history),
                      default=-1.0)
    self.history = [e for e in self.history if e['step'] != step] + [entry]
    if entry['validation']['top1'] > best_so_far:
      self.best.save(step)
    cluster.chief_only(self.strategy, storage.write_json, self.history_path,
                       self.history)
    with self.writer.as_default():
      for split in ('validation', 'test'):
        for key in ('top1', 'top5', 'loss'):
          tf.summary.scalar(f'{split}/{key}', entry[split][key], step=step)
      for name, top1 in others.items():
        tf.summary.scalar(f'validation/top1_{name}', top1, step=step)
    print(f'  step {step}: {self.selected.name} top-1 validation '
          f'{_top1(entry["validation"])}, test {_top1(entry["test"])}'
          + ''.join(f'; {name} validation {top1:.4f}'
                    for name, top1 in others.items()))
    return entry


def validation_curve(config: Config, strategy, manifest, model: keras.Model,
                     directory: str) -> Optional[Callable]:
  """A phase's on_eval logging `model`'s validation top-1, or None.

  For the finetuning and supervised phases under run.eval_all_networks: their
  curves in curves.png (the networks are evaluated on both splits at the
  end either way).
  """
  if not config.run.eval_all_networks:
    return None
  evaluator = Evaluator(strategy)
  writer = cluster.summary_writer(strategy, os.path.join(directory, 'logs',
                                                         'eval'))

  def on_eval(step: int) -> None:
    top1 = evaluate_split(evaluator, config, manifest, model,
                          'validation')['top1']
    with writer.as_default():
      tf.summary.scalar('validation/top1', top1, step=step)
    writer.flush()

  return on_eval


# What each reported network is, after its results.json key's suffix.
_WHAT = {'ema_student_finetuned': 'student (EMA), after finetuning',
         'ema_student': 'student (EMA), before finetuning',
         'student': 'student, no EMA', 'teacher': 'teacher',
         'uda_ema': 'UDA model (EMA)', 'uda': 'UDA model, no EMA',
         'supervised': 'supervised, same labels'}


def _describe(name: str) -> str:
  for suffix, what in _WHAT.items():
    if name == suffix or name.endswith('_' + suffix):
      return what
  return ''


def _top1(result: Dict[str, Any]) -> str:
  """A result's top-1 for the console; 'non-finite' when any logit is NaN
  or Inf (in_top_k would count those as misses and show 0.0000)."""
  if result.get('nonfinite'):
    return 'non-finite'
  return f'{result["top1"]:.4f}'


def check_finite_results(results: Dict[str, Any], what: str) -> None:
  """Raises NonFiniteError if a network of `results` gave NaN or Inf logits.

  Called after the results are printed and saved: a run (or an eval) whose
  network outputs NaN has failed, however it got there (e.g. resumed from
  finite but enormous weights, or a skip mode that finished with them),
  and must not end with status 0.
  """
  broken = nonfinite_networks(results)
  if broken:
    raise NonFiniteError(
        f'{what}: non-finite outputs (NaN or Inf logits) from {broken}: '
        f'the weights are broken (typically finite but so large that the '
        f'forward pass overflows), so their accuracy means nothing. Train '
        f'again with lower learning rates or --grad_clip_norm, in another '
        f'--model_dir.')


def print_results(results, models) -> None:
  """The final table: every network on the same validation and test images."""
  test_count = results[next(iter(models))]['test'].get('count')
  print('\n{:<27}{:<34}{:>11}{:>11}'.format(
      'top-1 of', '', 'validation', 'test') + (f' ({test_count} images)'
                                            if test_count else ''))
  # The supervised baseline first: what the labels alone give.
  order = sorted(models, key=lambda name: name != 'supervised')
  for name in order:
    print('{:<27}{:<34}{:>11}{:>11}'.format(
        name, _describe(name), _top1(results[name]['validation']),
        _top1(results[name]['test'])))
  history = results['selected_history']
  if history:
    best, median = history['best_on_validation'], history['median_last']
    print(f'{next(iter(models))}, best on validation (step {best["step"]}): '
          f'test top-1 {best["test"]["top1"]:.4f}; median of the last '
          f'{median["k"]} evaluations: test top-1 '
          f'{median["test"]["top1"]:.4f}')
