"""mpl_tf.MetaPseudoLabels: fit() is MplStep, with Keras's callbacks.

One fit step moves the networks exactly as one MplStep call from the same
state and batch; two replicas equal one device; a fit killed mid-epoch and
resumed by BackupAndRestore ends bitwise where an uninterrupted one does;
TensorBoard gets the step's scalars; save() writes a plain student. Bad
inputs are tests/test_keras_inputs.py's. Tiny float64 MLPs
(tests/tiny_models.py), as in tests/test_mpl_step.py.
"""

import dataclasses
import glob
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf

from mpl_tf import distribute
from mpl_tf import optim
import mpl_tf
from mpl_tf import keras_model
from mpl_tf.config import OptimConfig, RunConfig
from mpl_tf.mpl_step import MplStep
from mpl_tf.phase import NonFiniteError
from tests import test_mpl_step as reference
from tests.test_loss_scale import mlp
from tests.test_optim import released_start
from tests.tiny_models import keras_mlp, random_batch

DIM, HIDDEN, CLASSES = reference.INPUT_DIM, reference.HIDDEN, reference.NUM_CLASSES
LABELED, UNLABELED = reference.NUM_LABELED, reference.NUM_UNLABELED
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every knob of compile() and the constructor away from its default, so the
# comparison with MplStep covers how each reaches the step.
OPTIM = OptimConfig(optimizer='tf1_momentum', momentum=0.9, nesterov=True,
                    weight_decay=0.01, grad_clip_norm=5.0, ema_decay=0.5)
CONFIG = reference.mpl_config(baseline_decay=0.9)


def batches(count: int, seed: int = 0):
  return [random_batch(seed + i, LABELED, UNLABELED, DIM, CLASSES)
          for i in range(count)]


def dataset(batch_list) -> tf.data.Dataset:
  """The batches in order, with static shapes (as drop_remainder gives)."""
  return tf.data.Dataset.from_tensor_slices(
      {key: tf.stack([b[key] for b in batch_list]) for key in batch_list[0]})


def networks(dropout: bool = False):
  if dropout:
    make = reference._mlp_with_batch_norm_and_dropout  # pylint: disable=protected-access
    return make(0, 'teacher'), make(10, 'student')
  return (keras_mlp(DIM, HIDDEN, CLASSES, 0, 'teacher'),
          keras_mlp(DIM, HIDDEN, CLASSES, 10, 'student'))


def mpl_model(dropout: bool = False, keras_sgd: bool = False,
              **compile_args) -> keras_model.MetaPseudoLabels:
  """The model with the library's optimizers, or with Keras's own SGD."""
  teacher, student = networks(dropout)
  model = mpl_tf.MetaPseudoLabels(teacher, student, ema_decay=OPTIM.ema_decay)
  if keras_sgd:
    make = lambda rate, name: keras.optimizers.SGD(rate, momentum=0.9,
                                                   name=name)
  else:
    make = lambda rate, name: optim.make_optimizer(rate, OPTIM, name)
  model.compile(
      make(reference.TEACHER_LR, 'teacher_optimizer'),
      make(reference.STUDENT_LR, 'student_optimizer'),
      CONFIG, coupled_weight_decay=OPTIM.weight_decay,
      grad_clip_norm=OPTIM.grad_clip_norm, **compile_args)
  return model


def state(model: keras_model.MetaPseudoLabels):
  """Every number a resumed fit must restore, by name."""
  values = {}
  for name in ('teacher', 'student', 'ema_student'):
    values.update({f'{name}/{i}': v.numpy() for i, v in enumerate(
        getattr(model, name).weights)})
  for optimizer in (model.teacher_optimizer, model.student_optimizer):
    values.update({f'{optimizer.name}/{i}': v.numpy()
                   for i, v in enumerate(optimizer.variables)})
  values.update({f'step_state/{i}': tf.convert_to_tensor(v).numpy()
                 for i, v in enumerate(model._step_state())})  # pylint: disable=protected-access
  return values


class FitStepIsMplStepTest(tf.test.TestCase):

  def test_one_fit_step_equals_one_mpl_step_call(self):
    batch = batches(1)[0]
    teacher, student = networks()
    ema_student = keras_mlp(DIM, HIDDEN, CLASSES, 10, 'ema_student')
    step = MplStep(
        CONFIG, OPTIM, teacher, student,
        optim.make_optimizer(reference.TEACHER_LR, OPTIM, 'teacher_optimizer'),
        optim.make_optimizer(reference.STUDENT_LR, OPTIM, 'student_optimizer'),
        global_labeled_batch=LABELED, global_unlabeled_batch=UNLABELED,
        ema_student=ema_student)
    step.step.assign(reference.STEP_BEFORE)
    metrics, _ = tf.function(step)(batch)

    model = mpl_model()
    model.mpl_step.step.assign(reference.STEP_BEFORE)
    history = model.fit(dataset([batch]), epochs=1, verbose=0)

    self.assertEqual(model.step, reference.STEP_BEFORE + 1)
    self.assertNotEqual(float(metrics['mpl/h']), 0.0)
    self.assertAllClose(history.history['mpl_h'][0], metrics['mpl/h'])
    for mine, theirs in ((model.teacher, teacher), (model.student, student),
                         (model.ema_student, ema_student)):
      for a, b in zip(mine.weights, theirs.weights):
        self.assertAllEqual(a.numpy(), b.numpy(), msg=a.path)
    self.assertAllEqual(model.mpl_step.baseline.numpy(), step.baseline.numpy())
    # The networks moved, and the EMA is not the student (decay 0.5 here).
    self.assertNotAllClose(model.student.weights[0], networks()[1].weights[0])
    self.assertNotAllClose(model.ema_student.weights[0],
                           model.student.weights[0])

  def test_two_replicas_match_one_device(self):
    # Keras's own SGD, whose apply_gradients would sum the step's summed
    # gradients across replicas again (optim.sum_gradients_once).
    data = dataset(batches(2))
    single = mpl_model(keras_sgd=True)
    single_logs = single.fit(data, epochs=1, verbose=0).history
    strategy = distribute.get_strategy(RunConfig(strategy='mirrored'))
    self.assertEqual(strategy.num_replicas_in_sync, 2)
    with strategy.scope():
      mirrored = mpl_model(keras_sgd=True)
    as_tuples = data.map(lambda b: tuple(b[k] for k in keras_model.BATCH_KEYS))
    logs = mirrored.fit(as_tuples, epochs=1, verbose=0).history
    self.assertEqual(mirrored.step, 2)
    for key, value in single_logs.items():
      self.assertAllClose(logs[key], value, rtol=1e-6, msg=key)
    mine, theirs = state(mirrored), state(single)
    for key, value in theirs.items():
      self.assertAllClose(mine[key], value, rtol=1e-9, atol=1e-12, msg=key)


class _Interrupt(keras.callbacks.Callback):
  """Raises after BackupAndRestore saved batch `batch` of epoch `epoch`."""

  def __init__(self, epoch: int, batch: int):
    super().__init__()
    self.at, self.epoch = (epoch, batch), None

  def on_epoch_begin(self, epoch, logs=None):
    self.epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    if (self.epoch, batch) == self.at:
      raise RuntimeError('interrupted')


class _TempDirTestCase(tf.test.TestCase):

  def _temp_dir(self) -> str:
    directory = tempfile.TemporaryDirectory()
    self.addCleanup(directory.cleanup)
    return directory.name


class BackupAndRestoreTest(_TempDirTestCase):
  """Killed at a batch and resumed: bitwise the uninterrupted fit's state.

  Batch norm, dropout, momentum slots, the EMA and the h baseline all carry
  state across steps; the resumed fit also has to draw the same batches.
  """

  _uninterrupted = {}   # fit arguments -> the uninterrupted run's state

  def _check(self, data, fit_args, save_freq, interrupt):
    key = repr(sorted(fit_args.items()))
    if key not in self._uninterrupted:
      model = mpl_model(dropout=True)
      model.fit(data, verbose=0, **fit_args)
      self._uninterrupted[key] = state(model)
    backup_dir = self._temp_dir()
    backup = lambda: keras.callbacks.BackupAndRestore(backup_dir, save_freq)
    killed = mpl_model(dropout=True)
    with self.assertRaisesRegex(RuntimeError, 'interrupted'):
      killed.fit(data, verbose=0, callbacks=[backup(), _Interrupt(*interrupt)],
                 **fit_args)
    resumed = mpl_model(dropout=True)
    resumed.fit(data, verbose=0, callbacks=[backup()], **fit_args)
    mine, theirs = state(resumed), self._uninterrupted[key]
    self.assertEqual(mine.keys(), theirs.keys())
    for key, value in theirs.items():
      self.assertAllEqual(mine[key], value, msg=key)

  def test_finite_dataset_killed_mid_epoch(self):
    self._check(dataset(batches(3)), dict(epochs=2), 1, (1, 0))

  def test_endless_stream_killed_mid_epoch(self):
    stream = dataset(batches(5)).repeat()
    self._check(stream, dict(epochs=3, steps_per_epoch=2), 1, (1, 0))

  def test_endless_stream_killed_after_an_epoch(self):
    stream = dataset(batches(5)).repeat()
    self._check(stream, dict(epochs=3, steps_per_epoch=2), 'epoch', (1, 0))


class CallbacksTest(_TempDirTestCase):

  def test_tensorboard_gets_the_step_scalars(self):
    log_dir = self._temp_dir()
    model = mpl_model()
    model.fit(dataset(batches(2)), epochs=1, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(log_dir, update_freq=1)])
    tags = set()
    for path in glob.glob(os.path.join(log_dir, 'train', 'events*')):
      for event in tf.compat.v1.train.summary_iterator(path):
        tags.update(value.tag for value in event.summary.value)
    for name in ('mpl_h', 'teacher_uda_mask_rate', 'teacher_supervised_loss',
                 'teacher_uda_loss', 'student_pseudo_label_loss'):
      self.assertIn(f'epoch_{name}', tags)
      self.assertIn(f'batch_{name}', tags)

  def test_checkpoints_save_the_student_and_the_whole_state(self):
    directory = self._temp_dir()
    student_path = os.path.join(directory, 'student.keras')
    weights_path = os.path.join(directory, 'all.weights.h5')
    batch = batches(1)[0]
    images, labels = batch['labeled_images'], batch['labels']
    validation = tf.data.Dataset.from_tensors((images, labels))
    model = mpl_model(metrics=['accuracy'])
    history = model.fit(dataset(batches(2)), epochs=1, verbose=0,
                        validation_data=validation, callbacks=[
        keras.callbacks.ModelCheckpoint(student_path, monitor='val_accuracy',
                                        save_best_only=True),
        keras.callbacks.ModelCheckpoint(weights_path, save_weights_only=True)])
    self.assertIn('val_accuracy', history.history)
    # save(): the EMA student, a plain Keras model.
    loaded = keras.models.load_model(student_path)
    self.assertAllClose(loaded(images), model.ema_student(images))
    self.assertAllClose(loaded.predict(images, verbose=0),
                        model.predict(images, verbose=0))
    # evaluate(): the EMA student's compiled metrics, not the step's.
    results = model.evaluate(validation, verbose=0, return_dict=True)
    self.assertEqual(set(results), {'loss', 'accuracy'})
    correct = tf.argmax(model.ema_student(images), -1) == tf.cast(labels,
                                                                  tf.int64)
    self.assertAllClose(results['accuracy'],
                        tf.reduce_mean(tf.cast(correct, tf.float32)))
    # save_weights(): everything, into a model compiled alike.
    restored = mpl_model(metrics=['accuracy'])
    restored.load_weights(weights_path)
    self.assertEqual(restored.step, 2)
    mine, theirs = state(restored), state(model)
    for key, value in theirs.items():
      self.assertAllEqual(mine[key], value, msg=key)

  def test_a_nonfinite_step_stops_fit_before_any_callback_saves_it(self):
    weights_path = os.path.join(self._temp_dir(), 'all.weights.h5')
    poisoned = batches(2)
    poisoned[1] = dict(poisoned[1], labeled_images=poisoned[1][
        'labeled_images'] * float('nan'))
    model = mpl_model()
    with self.assertRaisesRegex(NonFiniteError, 'at step 2 '):
      model.fit(dataset(poisoned), verbose=0, callbacks=[
          keras.callbacks.ModelCheckpoint(weights_path, save_freq=1,
                                          save_weights_only=True)])
    restored = mpl_model()
    restored.load_weights(weights_path)
    self.assertEqual(restored.step, 1)   # the last finite state

  def test_compiling_again_keeps_the_step_state(self):
    model = mpl_model()
    model.train_on_batch(batches(1)[0])
    baseline = model.mpl_step.baseline.numpy()
    names = [metric.name for metric in model.metrics]
    model.compile(keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.1),
                  CONFIG)
    self.assertEqual(model.step, 1)
    self.assertEqual(model.mpl_step.baseline.numpy(), baseline)
    self.assertEqual([metric.name for metric in model.metrics], names)


class EmaStartTest(tf.test.TestCase):

  def test_the_first_compile_starts_the_ema_and_a_second_keeps_it(self):
    teacher, student = networks(dropout=True)   # with batch norm
    model = mpl_tf.MetaPseudoLabels(teacher, student, ema_decay=0.5)
    released = dataclasses.replace(CONFIG, ema_init='released_code')
    compile_with = lambda: model.compile(
        optim.make_optimizer(0.1, OPTIM, 'teacher_optimizer'),
        optim.make_optimizer(0.1, OPTIM, 'student_optimizer'), released)
    compile_with()
    for variable in model.ema_student.weights:
      self.assertAllEqual(variable.numpy(), np.full(
          variable.shape, released_start(variable.path.split('/')[-1])))
    # As if trained: a compile again must keep the average it has.
    model.ema_student.set_weights(student.get_weights())
    compile_with()
    for ema_weight, weight in zip(model.ema_student.weights, student.weights):
      self.assertAllEqual(ema_weight.numpy(), weight.numpy())


class Float16Test(_TempDirTestCase):
  """float16 networks: the step scales their losses (tests/test_loss_scale)."""

  def _model(self):
    model = mpl_tf.MetaPseudoLabels(mlp('mixed_float16', 0, 'teacher'),
                                    mlp('mixed_float16', 10, 'student'))
    model.compile(optim.make_optimizer(reference.TEACHER_LR, OPTIM, 'to'),
                  optim.make_optimizer(reference.STUDENT_LR, OPTIM, 'so'),
                  CONFIG)
    return model

  def test_overflows_are_skipped_and_save_weights_keeps_the_scales(self):
    model = self._model()
    scales = (model.mpl_step.student_scale, model.mpl_step.teacher_scale)
    self.assertTrue(all(scale.active for scale in scales))
    scales[0].scale.assign(2.0 ** 24)   # overflows (tests/test_loss_scale)
    model.fit(dataset(batches(2)), epochs=1, verbose=0)   # no NonFiniteError
    self.assertEqual(model.step, 2)
    self.assertLess(float(scales[0].scale), 2.0 ** 24)
    self.assertGreaterEqual(int(scales[0].overflow_steps), 1)
    path = os.path.join(self._temp_dir(), 'all.weights.h5')
    model.save_weights(path)
    restored = self._model()
    restored.load_weights(path)
    for mine, theirs in zip((restored.mpl_step.student_scale,
                             restored.mpl_step.teacher_scale), scales):
      self.assertEqual([float(v) for v in mine.variables],
                       [float(v) for v in theirs.variables])

  def test_a_loss_scale_optimizer_is_refused(self):
    model = mpl_tf.MetaPseudoLabels(*networks())
    with self.assertRaisesRegex(ValueError, 'inside the LossScaleOptimizer'):
      model.compile(keras.optimizers.LossScaleOptimizer(
          keras.optimizers.SGD(0.1)), keras.optimizers.SGD(0.1), CONFIG)


class ImportTest(tf.test.TestCase):

  def test_mpl_tf_is_light_and_exports_the_model_lazily(self):
    self.assertIs(mpl_tf.MetaPseudoLabels, keras_model.MetaPseudoLabels)
    code = ('import sys, mpl_tf, mpl_tf.config; '
            'print(sorted({"tensorflow", "keras"} & set(sys.modules)))')
    loaded = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                            capture_output=True, text=True, check=True,
                            timeout=60).stdout.strip()
    self.assertEqual(loaded, '[]')
