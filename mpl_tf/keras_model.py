"""Meta Pseudo Labels as a Keras model: `fit()` on any teacher and student.

Many who want MPL on their own data already have Keras networks and tf.data
pipelines, and train with `model.fit`, its callbacks (ModelCheckpoint,
BackupAndRestore, TensorBoard, EarlyStopping) and progress bar.
`MetaPseudoLabels` is a `keras.Model` that owns both networks, as Keras's own
knowledge-distillation and semi-supervised examples do, and whose
`train_step` is one call of the library's `MplStep` (Algorithm 1), not a copy
of it. `call`, `evaluate`, `predict` and `save` use the student, or its EMA
copy when `ema_decay > 0`. docs/keras_fit.md says when to use `fit()` and
when main.py (the paper's presets, TPUs, finetuning, streams rebuilt at any
step). TensorFlow backend of Keras 3 only: importing this module under
another backend raises an error naming KERAS_BACKEND=tensorflow, before
Keras is imported (keras_backend.py).

Losses are divided by the global batch sizes: `compile()`'s, else the first
batch's static sizes times the replicas. A batch of another size (a finite
dataset's last batch, unless batched with drop_remainder=True), labels that
are not integer class ids in [0, classes), images of mixed dtypes or not
images at all, stop `fit()` with one error before the step changes anything
(keras_batches.py), instead of training on wrong numbers.

`save_weights` (so BackupAndRestore) saves what Keras tracks (networks, EMA
student, optimizer slots and iterations) and what it does not: MplStep's
counter, h baseline and non-finite counters, the dropout seed states, the
loss scales of float16 networks (the step scales their losses itself,
loss_scale.py; not Keras's LossScaleOptimizer), and where the fit stands in
its data (keras_resume.py), so that a fit resumed mid-epoch ends with the
weights of an uninterrupted one.
"""

from typing import Dict, List, Optional, Sequence

from mpl_tf.keras_backend import check_backend, check_before_import

check_before_import()

# pylint: disable=g-import-not-at-top,wrong-import-position
import keras

check_backend(keras.backend.backend())

import tensorflow as tf

from mpl_tf import ema
from mpl_tf import keras_resume
from mpl_tf import keras_batches
from mpl_tf.keras_batches import BATCH_KEYS  # the batch's keys, for users
from mpl_tf import optim
from mpl_tf.config import Config, MplConfig, OptimConfig
from mpl_tf.config_checks import validate
from mpl_tf.models import random_states, replica_distinct_randomness
from mpl_tf.mpl_step import MplStep
from mpl_tf.phase import NonFiniteError, read_step
# pylint: enable=g-import-not-at-top,wrong-import-position

# The step's metrics that fit() logs by default (progress bar, History,
# TensorBoard), as running means over the epoch; '/' becomes '_' in logs.
STEP_METRICS = ('mpl/h', 'teacher/supervised_loss', 'teacher/uda_loss',
                'teacher/uda_mask_rate', 'student/pseudo_label_loss',
                'student/labeled_loss_new')


def log_name(step_metric: str) -> str:
  """The name a step metric has in fit()'s logs ('mpl/h' -> 'mpl_h')."""
  return step_metric.replace('/', '_')


class _FitHooks(keras.callbacks.Callback):
  """First of fit()'s callbacks: epoch bookkeeping and the non-finite stop.

  First, so that a non-finite state stops the fit before a checkpointing
  callback of the same batch can save it.
  """

  def on_epoch_begin(self, epoch, logs=None):
    model = self.model
    model.position.start_epoch(epoch, model.step, model.steps_per_execution)

  def on_train_batch_end(self, batch, logs=None):
    guard = self.model.mpl_step.guard
    if guard.policy == 'stop' and read_step(guard.first_step) >= 0:
      raise NonFiniteError(
          f'MetaPseudoLabels: non-finite value (NaN or Inf) at '
          f'{guard.describe()}; fit() stopped before any callback saw that '
          f'state. compile(nonfinite="skip") leaves such steps out instead.')


class MetaPseudoLabels(keras.Model):
  """A teacher and a student trained by `fit()` with Meta Pseudo Labels.

  Args:
    teacher, student: built Keras networks mapping images to logits (for
      example two instances of one architecture).
    ema_decay: > 0 keeps an exponential moving average of the student
      (decay warmed up as min(d, (t + 1) / (t + 10))), which `call`,
      `evaluate`, `predict` and `save` then use; 0: the student itself.
    ema_student: the network holding that average; by default a clone of
      the student (`keras.models.clone_model`, for functional networks).
    seed: seeds the pseudo-label draws (with the step) and the h baseline.

  Create it, and compile it, in the `strategy.scope()` the networks and
  optimizers were made in, if any.
  """

  def __init__(self, teacher: keras.Model, student: keras.Model, *,
               ema_decay: float = 0.0,
               ema_student: Optional[keras.Model] = None, seed: int = 0,
               name: str = 'meta_pseudo_labels', **kwargs):
    super().__init__(name=name, **kwargs)
    for role, network in (('teacher', teacher), ('student', student)):
      if not network.built or not network.trainable_weights:
        raise ValueError(
            f'MetaPseudoLabels: the {role} must be built (made with '
            f'keras.Input, or called once on a batch) before it is passed.')
    if not 0.0 <= ema_decay < 1.0:
      raise ValueError(f'ema_decay={ema_decay} must be in [0, 1).')
    self.teacher, self.student = teacher, student
    self._classes: Optional[int] = None
    self._num_classes()   # networks of two class counts stop here if static
    self.ema_decay, self.seed = float(ema_decay), int(seed)
    self.ema_student = None
    with self.distribute_strategy.scope():
      if ema_decay > 0:
        self.ema_student = (keras.models.clone_model(student)
                            if ema_student is None else ema_student)
        self.ema_student.set_weights(student.get_weights())
      self.position = keras_resume.FitPosition()
    self.mpl_step: Optional[MplStep] = None
    # A running mean per step metric ever logged (kept across compiles:
    # Keras tracks them for good), and those logged now.
    self._trackers: Dict[str, keras.metrics.Mean] = {}
    self._logged: Sequence[str] = ()
    self.built = True

  @property
  def network(self) -> keras.Model:
    """The network that `call`, `evaluate`, `predict` and `save` use."""
    return self.ema_student if self.ema_student is not None else self.student

  @property
  def step(self) -> int:
    """Training steps done (MplStep's counter t)."""
    return read_step(self.mpl_step.step)

  def call(self, inputs, training=None):
    return self.network(inputs, training=training)

  def compile(self, teacher_optimizer, student_optimizer,
              mpl_config: Optional[MplConfig] = None, *,
              coupled_weight_decay: float = 0.0,
              grad_clip_norm: float = OptimConfig.grad_clip_norm,
              labeled_batch_size: Optional[int] = None,
              unlabeled_batch_size: Optional[int] = None,
              nonfinite: str = 'stop',
              step_metrics: Sequence[str] = STEP_METRICS,
              loss=None, metrics=None, **kwargs):
    """The MPL step's optimizers and choices, and what `evaluate` reports.

    Args:
      teacher_optimizer, student_optimizer: two Keras optimizers (or names).
        The step sums gradients across replicas itself, so their own second
        sum is turned off (optim.sum_gradients_once); `model.optimizer` is
        the student's (what callbacks that read one optimizer see).
      mpl_config: the MPL choices (mpl_tf.config.MplConfig; default: the
        paper's Algorithm 1). Its ema_init sets the EMA student's start at
        the first compile.
      coupled_weight_decay: L2 added to the summed gradients (g + wd * w)
        of non-normalisation weights, as the released code; an optimizer's
        own weight_decay is decoupled and separate.
      grad_clip_norm: global-norm clipping of each network's gradients.
      labeled_batch_size, unlabeled_batch_size: the global batches (per
        view) the losses are divided by; default: the first batch's.
      nonfinite: 'stop' (fit raises NonFiniteError) or 'skip' (the step is
        undone; docs/reliability.md).
      step_metrics: MplStep metrics logged by fit() (see STEP_METRICS).
      loss, metrics: of `evaluate` on (images, labels) batches; loss
        defaults to sparse cross-entropy on logits.
      **kwargs: passed to keras.Model.compile (steps_per_execution,
        jit_compile, run_eagerly, ...).
    """
    mpl_config = mpl_config or MplConfig()
    optim_config = OptimConfig(optimizer='tf1_momentum',
                               weight_decay=coupled_weight_decay,
                               grad_clip_norm=grad_clip_norm,
                               ema_decay=self.ema_decay)
    validate(Config(mpl=mpl_config, optim=optim_config))
    if loss is None:
      loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    teacher_optimizer = keras.optimizers.get(teacher_optimizer)
    student_optimizer = keras.optimizers.get(student_optimizer)
    if teacher_optimizer is student_optimizer:
      raise ValueError('MetaPseudoLabels.compile: the teacher and the '
                       'student need two optimizer objects.')
    if any(isinstance(o, keras.optimizers.LossScaleOptimizer)
           for o in (teacher_optimizer, student_optimizer)):
      raise ValueError('MetaPseudoLabels.compile: pass the optimizer inside '
                       'the LossScaleOptimizer; the step scales the losses of '
                       'float16 networks itself (mpl_tf/loss_scale.py), and '
                       'a second scale would divide the gradients twice.')
    strategy = self.distribute_strategy
    previous = self._step_state() if self.mpl_step else None
    with strategy.scope():
      for optimizer, network in ((teacher_optimizer, self.teacher),
                                 (student_optimizer, self.student)):
        if optimizer._distribution_strategy is not strategy:  # pylint: disable=protected-access
          raise ValueError(
              f'MetaPseudoLabels.compile: optimizer {optimizer.name!r} was '
              f'made in another distribution strategy scope than the '
              f'model; make both in the same strategy.scope().')
        optim.sum_gradients_once(optimizer)
        optimizer.build(network.trainable_variables)
      if previous is None and self.ema_student is not None:
        # The EMA's start (mpl_config.ema_init), at the first compile only:
        # weights can be loaded only after it, and a compile again keeps
        # the average it has.
        ema.initialize(self.ema_student, self.student, mpl_config.ema_init)
      self.mpl_step = MplStep(
          mpl_config, optim_config, self.teacher, self.student,
          teacher_optimizer, student_optimizer,
          global_labeled_batch=labeled_batch_size or 0,
          global_unlabeled_batch=unlabeled_batch_size or 0,
          ema_student=self.ema_student, seed=self.seed, nonfinite=nonfinite)
      for name in step_metrics:
        if name not in self._trackers:
          self._trackers[name] = keras.metrics.Mean(name=log_name(name))
      self._logged = tuple(step_metrics)
    if previous is not None:   # compiled again: the step's state goes on
      for variable, value in zip(self._step_state(), previous):
        variable.assign(value)
    self.teacher_optimizer = teacher_optimizer
    self.student_optimizer = student_optimizer
    self._replica_step = replica_distinct_randomness(
        self.mpl_step, random_states(self.teacher, self.student))
    self._step_function = self._replica_step   # (make_train_function's)
    # (Not Keras's own loss scaling under a mixed_float16 global policy:
    # the step scales, see loss_scale.py.)
    kwargs.setdefault('auto_scale_loss', False)
    super().compile(optimizer=student_optimizer, loss=loss, metrics=metrics,
                    **kwargs)

  def _step_state(self) -> List[tf.Variable]:
    """What the step changes that Keras does not save: see the docstring."""
    step, guard = self.mpl_step, self.mpl_step.guard
    networks = [n for n in (self.teacher, self.student, self.ema_student)
                if n is not None]
    # The loss scales last, and only for float16 networks: weights files
    # of other networks keep their layout.
    return [step.step, step.baseline, guard.skipped_steps, guard.first_step,
            guard.first_terms, *self.position.variables,
            *random_states(*networks), *guard.loss_scale_variables()]

  def _num_classes(self, images: Optional[tf.Tensor] = None
                   ) -> Optional[int]:
    """The networks' class count, checked equal; None while unknown.

    Functional and Sequential networks give it when the model is made;
    subclassed ones at fit()'s first trace, from its images. Once, not per
    step: the labels' range check needs it, and networks of two counts
    would otherwise fail inside the step with a raw shape error.
    """
    if self._classes is None:
      counts = [keras_batches.output_classes(role, network, images)
                for role, network in (('teacher', self.teacher),
                                      ('student', self.student))]
      if None not in counts:
        keras_batches.check_class_counts(*counts)
        self._classes = counts[0]
    return self._classes

  def train_step(self, data):
    batch, checks = keras_batches.checked_batch(data, self.mpl_step,
                                                self._num_classes)
    # Every op of the step runs after the batch's checks: a wrong batch
    # changes no state.
    with tf.control_dependencies(checks):
      metrics, _ = self._step_function(batch)
    unknown = [name for name in self._logged if name not in metrics]
    if unknown:
      raise ValueError(f'MetaPseudoLabels: step_metrics {unknown} are not '
                       f'metrics of the step: {sorted(metrics)}.')
    for name in self._logged:
      self._trackers[name].update_state(metrics[name])
    return self._running_logs()

  def _running_logs(self) -> Dict[str, tf.Tensor]:
    return {log_name(name): self._trackers[name].result()
            for name in self._logged}

  def get_metrics_result(self):
    # Keras reads every metric at the end of each fit() epoch, where
    # evaluate's compiled metrics may not be built yet (they are built from
    # evaluate's first batch): those have no result to give yet.
    results = {}
    for metric in self.metrics:
      if getattr(metric, 'built', True):
        result = metric.result()
        results.update(result if isinstance(result, dict) else
                       {metric.name: result})
    return results

  def test_step(self, data):
    logs = super().test_step(data)
    return {name: value for name, value in logs.items()
            if name not in {log_name(n) for n in self._trackers}}

  def make_train_function(self, force=False):
    if self.train_function is not None and not force:
      return self.train_function
    # XLA compiles asserts to nothing (tf2xla ignores Assert), so under
    # jit_compile (Keras's default on a GPU) the batch's device checks
    # would vanish and a bad batch train: Keras's function is then made
    # without XLA and only the replica step is compiled, with the checks
    # in the graph around it, as main.py's device loop does.
    jit = self.jit_compile
    self._step_function = self._replica_step if not jit else tf.function(
        self._replica_step, jit_compile=True, autograph=False)
    self.jit_compile = False
    try:
      super().make_train_function(force)
    finally:
      self.jit_compile = jit
    self.train_function = self.position.wrap(
        self.train_function, lambda: self.step, self._running_logs)
    return self.train_function

  def fit(self, x=None, y=None, **kwargs):  # pylint: disable=arguments-differ
    """keras.Model.fit on MPL batches (no `y`: the labels are in them)."""
    if y is not None:
      raise ValueError('MetaPseudoLabels.fit takes no y: the labels are part '
                       'of each batch (see BATCH_KEYS).')
    if self.mpl_step is None:
      raise RuntimeError('MetaPseudoLabels: compile() before fit().')
    self.position.start_fit(x, kwargs.get('steps_per_epoch'))
    # MPL batches come from a tf.data pipeline, which shuffles by itself.
    kwargs.setdefault('shuffle', False)
    hooks = _FitHooks()
    callbacks = kwargs.pop('callbacks', None)
    if isinstance(callbacks, keras.callbacks.CallbackList):
      hooks.set_model(self)
      callbacks.callbacks.insert(0, hooks)
    else:
      callbacks = [hooks, *(callbacks or [])]
    return super().fit(x, callbacks=callbacks, **kwargs)

  def _symbolic_build(self, iterator=None, data_batch=None):
    # Under a strategy, Keras builds the compiled loss and metrics from the
    # first training batch (keras/src/backend/tensorflow/trainer.py,
    # _maybe_symbolic_build); they are evaluate's, so it gets the labeled
    # (images, labels) that evaluate's batches look like.
    batch = (keras_batches.parse_batch(data_batch)
             if data_batch is not None else None)
    if batch is not None:
      data_batch = (batch['labeled_images'], batch['labels'])
    return super()._symbolic_build(iterator=iterator, data_batch=data_batch)

  def _own_saved_state(self) -> List[tf.Variable]:
    if self.mpl_step is None:
      raise RuntimeError('MetaPseudoLabels: compile() before save_weights() '
                         'or load_weights(): they include the step\'s state.')
    return (self._trainable_variables + self._non_trainable_variables +
            self._step_state())

  def save_own_variables(self, store):
    for index, variable in enumerate(self._own_saved_state()):
      store[str(index)] = tf.convert_to_tensor(variable).numpy()

  def load_own_variables(self, store):
    state = self._own_saved_state()
    if len(store.keys()) != len(state):
      raise ValueError(
          f'MetaPseudoLabels: the weights file holds {len(store.keys())} '
          f'variables of the MPL model itself where this one has '
          f'{len(state)} (step, h baseline, counters, dropout seeds): it was '
          f'saved from other networks or another version.')
    for index, variable in enumerate(state):
      variable.assign(store[str(index)][...])
    self.position.restored = True

  def save(self, filepath, overwrite=True, **kwargs):  # pylint: disable=arguments-differ
    """Saves `network` (the EMA student, else the student) as a .keras file.

    A plain Keras model: `keras.models.load_model` reads it without mpl_tf.
    The whole training state is `save_weights`'s.
    """
    return self.network.save(filepath, overwrite=overwrite, **kwargs)
