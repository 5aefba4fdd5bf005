"""The training loop: owns time, checkpoints, summaries, evaluation, results.

`run(config)` lives through a whole experiment in `model_dir`:

1. MPL (teacher + student + EMA student) for `optim.num_steps` steps, in
   device loops of `steps_per_loop` steps (one `tf.function` running
   `tf.range` over `strategy.run`), with a checkpoint every `checkpoint_every`
   steps and an evaluation every `eval_every` steps: validation (which selects
   the best EMA student) and test (which is only reported).
2. Optionally, finetuning of the EMA student on the labeled images
   (`finetune.steps`), reported beside the un-finetuned student.
3. Optionally, a supervised-only baseline on the same labeled images with the
   same seed, schedule and step count (`run.supervised_baseline`).

Every phase resumes by itself from its latest checkpoint in `model_dir`: one
tf.train.Checkpoint holds the networks, the optimizers (slots and step
counters), the step, the h baseline and the dropout RNG states; the input
streams and pseudo-label draws are pure functions of (seed, step), so they
are rebuilt at the restored step, and a resumed run continues as if it had
never stopped. A model_dir holding a run of another configuration is
refused.

Where the parts live: preflight.py checks data, batches and model_dir
before anything is written (a wrong setting ends with one message and an
empty model_dir); phase.py runs one phase (device loops, checkpoints,
summaries, the non-finite policy: docs/reliability.md); evaluations.py
evaluates, keeps the best network and prints the final table; this module
builds each algorithm's phase (from the phase kinds below: on labeled and
unlabeled batches, or on labeled batches alone; all sharing one RunContext)
and runs the phases in order.
"""

import dataclasses
import os
import time
from typing import Any, Callable, Dict, List, Optional

import keras
import tensorflow as tf

from mpl_tf import checkpoints
from mpl_tf import cluster
from mpl_tf import curves
from mpl_tf import distribute
from mpl_tf import ema
from mpl_tf import optim
from mpl_tf import preflight
from mpl_tf import storage
from mpl_tf.config import Config, ConfigError
from mpl_tf.data import pipeline
from mpl_tf.evaluate import summarize
from mpl_tf.evaluations import (Evaluations, check_finite_results,
                                print_results, validation_curve)
from mpl_tf.models import build_model
from mpl_tf.mpl_step import MplStep
from mpl_tf.phase import Phase, RunContext, read_step
from mpl_tf.supervised_step import SupervisedStep
from mpl_tf.uda_step import UdaStep


def run(config: Config) -> Dict[str, Any]:
  """Trains, finetunes and evaluates; writes config.json and results.json.

  A SIGTERM ends the run at the next device-loop boundary, after a
  checkpoint (cluster.StopRequested); running it again resumes there.
  """
  # The strategy before any TensorFlow op: MultiWorkerMirroredStrategy
  # configures the collective ops at program start-up, and refuses after.
  strategy = distribute.get_strategy(config.run)
  if config.run.deterministic:
    tf.config.experimental.enable_op_determinism()
    # keras-cv's augmentation layers ask for the global generator when they
    # are built (they draw from stateless seeds afterwards); under op
    # determinism it must be set explicitly first.
    tf.random.set_global_generator(
        tf.random.Generator.from_seed(config.run.seed))
  try:
    manifest = preflight.check_and_start(
        config, strategy,
        [os.path.join(directory, 'checkpoints')
         for directory in phase_directories(config).values()],
        lambda manifest: _check_inputs(config, strategy, manifest))
    with cluster.StopRequest(strategy) as stop:
      return _run(config, strategy, manifest, stop)
  except tf.errors.OpError as error:
    # A worker that died mid-run: one line instead of a traceback.
    lost = cluster.lost_peer(strategy, error)
    if lost is None:
      raise
    raise lost from None


def phase_directories(config: Config) -> Dict[str, str]:
  """Where each phase of this run keeps its checkpoints and logs."""
  run_cfg = config.run
  directories = {'main': run_cfg.model_dir}
  if config.finetune.steps:
    directories['finetune'] = os.path.join(run_cfg.model_dir, 'finetune')
  if run_cfg.supervised_baseline and run_cfg.algorithm != 'supervised':
    directories['supervised'] = os.path.join(run_cfg.model_dir, 'supervised')
  return directories


def _check_inputs(config: Config, strategy, manifest) -> None:
  """Builds (without reading) this worker's input of every phase.

  Before the first write (preflight.check_and_start): an input that this
  cluster cannot shard (e.g. fewer files than hosts) refuses the run while
  model_dir is still as it was, not after config.json is written. Only
  where the input is split between hosts: one host's input has nothing to
  shard, and building it costs a second or two per run.
  """
  if not cluster.is_multi_host(strategy):
    return
  kinds = {('mpl' if config.run.algorithm != 'supervised' else 'supervised',
            config.optim.labeled_batch_size)}
  if config.finetune.steps:
    kinds.add(('supervised', config.finetune.batch_size or
               config.optim.labeled_batch_size))
  if 'supervised' in phase_directories(config):
    kinds.add(('supervised', config.optim.labeled_batch_size))
  for kind, batch_size in sorted(kinds):
    stream = _dataset_fn(config, manifest, kind, batch_size)
    strategy.distribute_datasets_from_function(
        lambda context, stream=stream: stream(context, 0))


def _run(config: Config, strategy, manifest,
         stop: cluster.StopRequest) -> Dict[str, Any]:
  run_cfg, optim_cfg = config.run, config.optim
  model_dir = run_cfg.model_dir
  num_classes, image_size = manifest['num_classes'], config.data.image_size
  print(f'data: {config.data.dataset} in {config.data.data_dir}: ' +
        ', '.join(f'{split} {manifest["counts"][split]}'
                  for split in ('labeled', 'unlabeled', 'validation', 'test')))
  print(f'strategy: {type(strategy).__name__} with '
        f'{strategy.num_replicas_in_sync} replica(s)' +
        (f'; worker {cluster.worker_id(strategy)}'
         f'{" (chief)" if cluster.is_chief(strategy) else ""}'
         if cluster.is_multi_worker(strategy) else ''))

  keras.utils.set_random_seed(run_cfg.seed)
  build = lambda name: build_model(config.model, num_classes, image_size, name)
  context = RunContext(config, strategy, manifest, stop)
  with strategy.scope():
    training = _build_training(context, build)
  print(f'{run_cfg.algorithm}: {config.model.name}, '
        f'{training.selected.count_params():,} parameters per network')

  evaluations = Evaluations(config, strategy, manifest, training.selected,
                             model_dir, training.others)
  restored = training.phase.restore()
  evaluations.load_history(restored)
  if (run_cfg.eval_every and 0 < restored < optim_cfg.num_steps and
      restored % run_cfg.eval_every == 0 and not evaluations.has(restored)):
    # The checkpoint of an evaluation step is saved before the evaluation;
    # a run killed during it (stop.sh's wait ran out, a preemption) resumes
    # here and evaluates that step first, so no evaluation is lost.
    evaluations.record(restored)
  costs = phase_costs(config)
  start = time.time()
  training.phase.train(evaluations.record, sum(costs[1:]) / costs[0] *
                       optim_cfg.num_steps if costs[0] else 0.0)
  timings = {'train_seconds': time.time() - start}
  final_step = read_step(training.step_counter)
  if not evaluations.history or evaluations.history[-1]['step'] != final_step:
    evaluations.record(final_step)

  models = dict(training.networks)
  results: Dict[str, Any] = {}
  if config.finetune.steps:
    finetuned, seconds = _finetune(context, training.selected, build,
                                   costs[2] / costs[1] if costs[1] else 0.0)
    models[f'{next(iter(training.networks))}_finetuned'] = finetuned
    timings['finetune_seconds'] = seconds
  if run_cfg.supervised_baseline and run_cfg.algorithm != 'supervised':
    keras.utils.set_random_seed(run_cfg.seed)
    with strategy.scope():
      supervised = build('supervised')
      supervised_lr, _ = optim.learning_rates(optim_cfg)
      phase = _supervised_phase(
          'supervised', context, model=supervised,
          optimizer=optim.make_optimizer(supervised_lr, optim_cfg,
                                         'supervised_optimizer', supervised),
          num_steps=run_cfg.supervised_steps or optim_cfg.num_steps,
          batch_size=optim_cfg.labeled_batch_size,
          weight_decay_config=optim_cfg,
          directory=phase_directories(config)['supervised'])
      phase.write_images = False
    start = time.time()
    phase.train(validation_curve(config, strategy, manifest, supervised,
                                 phase_directories(config)['supervised']))
    timings['supervised_seconds'] = time.time() - start
    models['supervised'] = supervised

  for name, model in models.items():
    if model is training.selected:
      # Just evaluated at the final step: the last history entry.
      last = evaluations.history[-1]
      results[name] = {split: last[split] for split in ('validation', 'test')}
    else:
      results[name] = {split: evaluations.evaluate(model, split)
                       for split in ('validation', 'test')}
  results['selected_history'] = summarize(evaluations.history,
                                          run_cfg.eval_median_last)
  results['timings'] = timings
  cluster.chief_only(strategy, storage.write_json,
                     os.path.join(model_dir, 'results.json'), results)
  print_results(results, models)
  check_finite_results({name: results[name] for name in models},
                       f'the run in {model_dir!r}')
  if cluster.is_chief(strategy):
    try:
      drawn = curves.write_curves(model_dir, optim_cfg.num_steps)
    except (OSError, ValueError, tf.errors.OpError) as error:
      # The run itself is done and saved; a picture must not fail it.
      drawn = ''
      print(f'curves.png not drawn: {error}')
    if drawn:
      print(f'curves: {drawn}')
  return results


@dataclasses.dataclass
class _Training:
  """What run() trains: its phase, step counter and networks to report."""
  phase: Phase
  step_counter: tf.Variable
  networks: Dict[str, keras.Model]   # reported at the end, by name
  selected: keras.Model              # selected on validation, finetuned, served
  # Validated at every evaluation under run.eval_all_networks (curves.png).
  others: Dict[str, keras.Model] = dataclasses.field(default_factory=dict)


def _build_training(context: RunContext, build) -> _Training:
  """The phase of `run.algorithm`, built in the strategy's scope."""
  config = context.config
  algorithm, optim_cfg = config.run.algorithm, config.optim
  model_dir = config.run.model_dir
  batches = dict(global_labeled_batch=optim_cfg.labeled_batch_size,
                 global_unlabeled_batch=config.unlabeled_batch_size)
  teacher_lr, student_lr = optim.learning_rates(optim_cfg)
  if algorithm in ('mpl', 'pseudo_labels'):
    # pseudo_labels is the MPL step with mpl_weight = uda_weight = 0
    # (config_checks.validate checks): a teacher trained on the labels alone.
    teacher, student, ema_student = (build('teacher'), build('student'),
                                     build('ema_student'))
    # The EMA's start, once (a resumed run's checkpoint overwrites it).
    ema.initialize(ema_student, student, config.mpl.ema_init)
    mpl_step = MplStep(
        config.mpl, optim_cfg, teacher, student,
        optim.make_optimizer(teacher_lr, optim_cfg, 'teacher_optimizer',
                             teacher),
        optim.make_optimizer(student_lr, optim_cfg, 'student_optimizer',
                             student),
        ema_student=ema_student, seed=config.run.seed,
        nonfinite=config.run.nonfinite, **batches)
    phase = _unlabeled_phase(algorithm, context, mpl_step,
                             mpl_replica_step(mpl_step),
                             [teacher, student, ema_student])
    networks = {f'{algorithm}_ema_student': ema_student,
                f'{algorithm}_student': student,
                f'{algorithm}_teacher': teacher}
    return _Training(phase, mpl_step.step, networks, ema_student,
                     {'student': student, 'teacher': teacher})
  if algorithm == 'uda':
    model, ema_model = build('uda'), build('uda_ema')
    ema.initialize(ema_model, model, config.mpl.ema_init)
    uda_step = UdaStep(config.mpl, optim_cfg, model,
                       optim.make_optimizer(teacher_lr, optim_cfg,
                                            'optimizer', model),
                       ema_model=ema_model, nonfinite=config.run.nonfinite,
                       **batches)
    phase = _unlabeled_phase('uda', context, uda_step, uda_step,
                             [model, ema_model])
    return _Training(phase, uda_step.step,
                     {'uda_ema': ema_model, 'uda': model},
                     ema_model, {'uda': model})
  if algorithm == 'supervised':
    model = build('supervised')
    optimizer = optim.make_optimizer(teacher_lr, optim_cfg, 'optimizer', model)
    phase = _supervised_phase(
        'supervised', context, model=model, optimizer=optimizer,
        num_steps=optim_cfg.num_steps,
        batch_size=optim_cfg.labeled_batch_size,
        weight_decay_config=optim_cfg, directory=model_dir,
        model_key=checkpoints.DEFAULT_ITEM)
    return _Training(phase, optimizer.iterations, {'supervised': model},
                     model)
  raise ConfigError(f'algorithm={algorithm!r} is not mpl, pseudo_labels, uda '
                    f'or supervised.')


def _unlabeled_phase(name: str, context: RunContext, train_step,
                     replica_step: Callable, models) -> Phase:
  """A phase on labeled and unlabeled batches (MPL, UDA) in model_dir."""
  config = context.config
  return Phase(
      name, context, replica_step=replica_step, step_counter=train_step.step,
      checkpoint_items=train_step.checkpoint_items(),
      dataset_fn=_dataset_fn(config, context.manifest, 'mpl'),
      num_steps=config.optim.num_steps, splits=('labeled', 'unlabeled'),
      directory=config.run.model_dir, models=models, guard=train_step.guard)


def _supervised_phase(name: str, context: RunContext, *, model: keras.Model,
                      optimizer, num_steps: int, batch_size: int,
                      weight_decay_config, directory: str,
                      model_key: str = 'model') -> Phase:
  """A phase on labeled batches alone (baseline, finetuning, supervised)."""
  config = context.config
  supervised_step = SupervisedStep(model, optimizer, weight_decay_config,
                                   config.mpl.label_smoothing, batch_size,
                                   nonfinite=config.run.nonfinite,
                                   microbatches=config.mpl.microbatches)
  return Phase(
      name, context, replica_step=supervised_step,
      step_counter=optimizer.iterations,
      checkpoint_items={model_key: model, 'optimizer': optimizer,
                        'health': supervised_step.guard.checkpoint_item()},
      dataset_fn=_dataset_fn(config, context.manifest, 'supervised',
                             batch_size),
      num_steps=num_steps, splits=('labeled',), directory=directory,
      models=[model], guard=supervised_step.guard)


def mpl_replica_step(mpl_step: MplStep) -> Callable:
  """The MPL step plus the diagnostics the loop logs."""

  def replica_step(batch):
    metrics, outputs = mpl_step(batch)
    metrics = dict(metrics)
    metrics['mpl/h_positive'] = tf.cast(metrics['mpl/h'] > 0, tf.float32)
    if 'unlabeled_labels' in batch:
      correct = tf.equal(outputs['pseudo_label_ids'],
                         tf.cast(batch['unlabeled_labels'], tf.int32))
      metrics['student/pseudo_label_accuracy'] = tf.reduce_mean(
          tf.cast(correct, tf.float32))
    return metrics

  return replica_step


def _dataset_fn(config: Config, manifest, kind: str, batch_size: int = 0):
  """stream(input_context, start_step, small_batch=None): a phase's input.

  `small_batch` gives the same kind of stream in batches of that many
  labeled images (and as many unlabeled ones), for image summaries.
  """

  def stream(context, step, small_batch: Optional[int] = None):
    if kind == 'mpl':
      small = config if small_batch is None else dataclasses.replace(
          config, optim=dataclasses.replace(
              config.optim, labeled_batch_size=small_batch, uda_ratio=1))
      return pipeline.train_dataset(small, manifest, context, step)
    return pipeline.labeled_dataset(config, manifest,
                                    small_batch or batch_size, context, step)

  return stream


def _finetune(context: RunContext, ema_student, build, later_steps: float):
  """Trains a copy of the EMA student on the labeled images alone."""
  config, strategy, manifest = (context.config, context.strategy,
                                context.manifest)
  finetune = config.finetune
  batch_size = finetune.batch_size or config.optim.labeled_batch_size
  decay_config = dataclasses.replace(config.optim,
                                     weight_decay=finetune.weight_decay)
  with strategy.scope():
    finetuned = build('finetuned_student')
    finetuned.set_weights(ema_student.get_weights())
    schedule = optim.WarmupCosine(finetune.learning_rate, finetune.steps)
    phase = _supervised_phase(
        'finetune', context, model=finetuned,
        optimizer=optim.make_optimizer(schedule, decay_config,
                                       'finetune_optimizer', finetuned),
        num_steps=finetune.steps, batch_size=batch_size,
        weight_decay_config=decay_config,
        directory=phase_directories(config)['finetune'],
        # checkpoints.DEFAULT_ITEM, the key export serves: the finetuned
        # student replaces the EMA one.
        model_key=checkpoints.DEFAULT_ITEM)
    phase.write_images = False
  start = time.time()
  phase.train(validation_curve(config, strategy, manifest, finetuned,
                               phase_directories(config)['finetune']),
              later_steps * finetune.steps)
  return finetuned, time.time() - start


def phase_costs(config: Config) -> List[float]:
  """[main, finetune, supervised baseline]: each phase's whole work.

  In images through a forward and backward pass (the FLOP counts of
  benchmarks/step_benchmark.py), for the ETA over the remaining phases.
  """
  optim_cfg, run_cfg = config.optim, config.run
  batch, mu = optim_cfg.labeled_batch_size, optim_cfg.uda_ratio
  per_step = {'mpl': batch * (3 + 3 * mu), 'pseudo_labels': batch * (3 + 3 * mu),
              'uda': batch * (1 + 2 * mu)}.get(run_cfg.algorithm, batch)
  finetune = config.finetune.steps * (config.finetune.batch_size or batch)
  supervised = ((run_cfg.supervised_steps or optim_cfg.num_steps) * batch
                if run_cfg.supervised_baseline and
                run_cfg.algorithm != 'supervised' else 0)
  return [float(optim_cfg.num_steps * per_step), float(finetune),
          float(supervised)]
