"""The training loop: owns time, progress, evaluation, checkpoints and results.

`run(config)` trains MPL (teacher + student) for `num_steps`, then, if asked,
a supervised-only model on the same labeled images with the same seed, and
evaluates every network on the validation split (model selection) and the
test split (the report). This first version runs on one device; the
distributed loop comes with the training-system issue.
"""

import json
import os
import time
from typing import Callable, Dict

import keras
import tensorflow as tf

from mpl_tf import optim
from mpl_tf.config import Config
from mpl_tf.data import offline, pipeline
from mpl_tf.evaluate import Evaluator
from mpl_tf.models import build_model
from mpl_tf.mpl_step import MplStep
from mpl_tf.progress import Progress
from mpl_tf.supervised_step import SupervisedStep

# Scalars shown on the progress line (all are written to the log).
_SHOWN = ('teacher/supervised_loss', 'teacher/uda_loss',
          'teacher/uda_mask_rate', 'student/pseudo_label_loss',
          'student/labeled_loss_new', 'mpl/h')


def _write_json(model_dir: str, name: str, payload) -> None:
  path = os.path.join(model_dir, name)
  with open(path + '.tmp', 'w') as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(path + '.tmp', path)


def _train(step_fn: Callable, iterator, num_steps: int, label: str,
           log_every: int, on_eval: Callable = None, eval_every: int = 0):
  """Runs `num_steps` calls of `step_fn`, showing progress; returns last metrics."""
  progress = Progress(label, num_steps, log_every)
  metrics = {}
  for step in range(1, num_steps + 1):
    metrics = {k: float(v) for k, v in step_fn(next(iterator)).items()}
    progress.update(step, {k: v for k, v in metrics.items() if k in _SHOWN
                           or k.startswith('supervised/loss')})
    if on_eval and eval_every and step % eval_every == 0 and step < num_steps:
      on_eval(step)
  progress.close()
  return metrics


def run(config: Config) -> Dict[str, Dict[str, float]]:
  """Trains and evaluates; writes config.json and results.json to model_dir."""
  run_cfg, optim_cfg = config.run, config.optim
  # Data first: a missing data set fails before anything is written.
  manifest = offline.ensure_prepared(config.data)
  os.makedirs(run_cfg.model_dir, exist_ok=True)
  _write_json(run_cfg.model_dir, 'config.json', config.to_dict())
  num_classes, image_size = manifest['num_classes'], config.data.image_size
  print(f'data: {config.data.dataset} in {config.data.data_dir}: ' +
        ', '.join(f'{split} {manifest["counts"][split]}'
                  for split in ('labeled', 'unlabeled', 'validation', 'test')))

  keras.utils.set_random_seed(run_cfg.seed)
  build = lambda name: build_model(config.model, num_classes, image_size, name)
  teacher, student, ema_student = build('teacher'), build('student'), build(
      'ema_student')
  ema_student.set_weights(student.get_weights())
  teacher_lr, student_lr = optim.learning_rates(optim_cfg)
  mpl_step = MplStep(
      config.mpl, optim_cfg, teacher, student,
      optim.make_optimizer(teacher_lr, optim_cfg, 'teacher_optimizer'),
      optim.make_optimizer(student_lr, optim_cfg, 'student_optimizer'),
      global_labeled_batch=optim_cfg.labeled_batch_size,
      global_unlabeled_batch=config.unlabeled_batch_size,
      ema_student=ema_student, seed=run_cfg.seed)
  print(f'networks: {config.model.name}, {student.count_params():,} '
        f'parameters each; MPL: {config.mpl}')

  evaluator = Evaluator()
  eval_split = lambda split: pipeline.eval_dataset(
      config, manifest, split, run_cfg.eval_batch_size)
  validation_history = []

  def evaluate_during_training(step):
    result = evaluator(ema_student, eval_split('validation'))
    validation_history.append({'step': step, **result})
    print(f'\n  step {step}: EMA student validation top-1 {result["top1"]:.4f}')

  train_iterator = iter(pipeline.train_dataset(config, manifest))
  mpl_fn = tf.function(lambda batch: mpl_step(batch)[0])
  start = time.time()
  _train(mpl_fn, train_iterator, optim_cfg.num_steps, 'MPL', run_cfg.log_every,
         evaluate_during_training, run_cfg.eval_every)
  mpl_seconds = time.time() - start
  checkpoint = tf.train.Checkpoint(**mpl_step.checkpoint_items())
  checkpoint.write(os.path.join(run_cfg.model_dir, 'checkpoints', 'final'))

  models = {'mpl_ema_student': ema_student, 'mpl_student': student,
            'mpl_teacher': teacher}
  timings = {'mpl_seconds': mpl_seconds}
  if run_cfg.supervised_baseline:
    keras.utils.set_random_seed(run_cfg.seed)
    supervised = build('supervised')
    supervised_lr, _ = optim.learning_rates(optim_cfg)
    supervised_step = SupervisedStep(
        supervised, optim.make_optimizer(supervised_lr, optim_cfg,
                                         'supervised_optimizer'),
        optim_cfg, config.mpl.label_smoothing, optim_cfg.labeled_batch_size)
    labeled_iterator = iter(pipeline.labeled_dataset(
        config, manifest, optim_cfg.labeled_batch_size))
    start = time.time()
    _train(tf.function(supervised_step), labeled_iterator,
           run_cfg.supervised_steps or optim_cfg.num_steps, 'supervised',
           run_cfg.log_every)
    timings['supervised_seconds'] = time.time() - start
    models['supervised'] = supervised

  results = {name: {split: evaluator(model, eval_split(split))
                    for split in ('validation', 'test')}
             for name, model in models.items()}
  results['validation_history'] = validation_history
  results['timings'] = timings
  _write_json(run_cfg.model_dir, 'results.json', results)
  _print_results(results, models)
  return results


def _print_results(results, models) -> None:
  print('\n{:<22}{:>16}{:>12}'.format('model', 'validation top-1', 'test top-1'))
  for name in models:
    print('{:<22}{:>16.4f}{:>12.4f}'.format(
        name, results[name]['validation']['top1'], results[name]['test']['top1']))
