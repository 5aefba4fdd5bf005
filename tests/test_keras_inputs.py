"""MetaPseudoLabels.fit on bad inputs: one clear error, and no step taken.

Issue 22: each wrong input stops fit() with one message naming the input
and the fix, before the step changes any variable; the forms fit() takes
besides the plain one ([batch, 1] labels, uint8 images, as keras.datasets
gives them) train on what they say. The expected losses are computed here
with Keras's own sparse cross-entropy. The tiny float64 MLPs and fixtures
of tests/test_keras_model.py.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf

import mpl_tf
from mpl_tf import keras_backend
from mpl_tf import keras_model
from mpl_tf.keras_batches import IMAGE_KEYS
from tests.test_keras_model import (CLASSES, CONFIG, DIM, HIDDEN, LABELED,
                                    REPO, UNLABELED, batches, dataset,
                                    mpl_model, networks)
from tests.tiny_models import keras_mlp


def unchanged(test: tf.test.TestCase, model) -> None:
  """Asserts that `model` took no step: counter, networks, optimizers."""
  test.assertEqual(model.step, 0)
  for mine, fresh in zip((model.teacher, model.student), networks()):
    for a, b in zip(mine.weights, fresh.weights):
      test.assertAllEqual(a.numpy(), b.numpy(), msg=a.path)
  for optimizer in (model.teacher_optimizer, model.student_optimizer):
    test.assertEqual(int(optimizer.iterations.numpy()), 0)


def fails(test: tf.test.TestCase, model, batch, error, pattern) -> None:
  """fit() on the one batch raises `error` matching `pattern`, no step."""
  data = (dataset([batch]) if isinstance(batch, dict) else
          tf.data.Dataset.from_tensors(batch))
  with test.assertRaisesRegex(error, pattern):
    model.fit(data, verbose=0)
  unchanged(test, model)


class LabelsTest(tf.test.TestCase):

  def test_keras_datasets_form_trains_on_its_labels(self):
    # uint8 images and uint8 labels [B, 1], as keras.datasets.cifar10 gives
    # them: without squeezing, [B, 1] broadcast against the logits made the
    # supervised losses about B times too large.
    batch = batches(1)[0]
    images = {key: tf.cast(tf.abs(batch[key]) * 3, tf.uint8)
              for key in IMAGE_KEYS}
    labels = batch['labels'].numpy()
    teacher = networks()[0]   # the model's teacher before its update
    model = mpl_model()
    logs = model.fit(dataset([dict(
        batch, labels=tf.constant(labels[:, None], tf.uint8), **images)]),
                     verbose=0).history
    x = tf.cast(images['labeled_images'], tf.float64)
    loss = lambda network: np.mean(keras.losses.sparse_categorical_crossentropy(
        labels, network(x), from_logits=True))
    self.assertEqual(model.step, 1)
    self.assertAllClose(logs['teacher_supervised_loss'][0], loss(teacher),
                        rtol=1e-6)
    # (The student's labeled loss after its update, at its new weights.)
    self.assertAllClose(logs['student_labeled_loss_new'][0],
                        loss(model.student), rtol=1e-6)

  def test_labels_that_are_not_integer_class_ids(self):
    batch = batches(1)[0]
    labels = batch['labels']
    model = mpl_model()
    for bad, fix in (
        (tf.cast(labels, tf.float32), r'tf\.cast\(labels, tf\.int32\)'),
        (tf.one_hot(labels, CLASSES), r'tf\.argmax\(labels, axis=-1\)'),
        (tf.one_hot(labels, CLASSES, dtype=tf.int64), r'tf\.argmax'),
        (tf.zeros([LABELED, 1, 1], tf.int32), r'static shape \[batch\]')):
      with self.subTest(labels=f'{bad.dtype.name} {bad.shape}'):
        described = f'{bad.dtype.name} of shape {bad.shape.as_list()}'
        fails(self, model, dict(batch, labels=bad), ValueError,
              f'labels are {re.escape(described)}.*integer class ids.*{fix}')

  def test_labels_outside_the_classes_stop_fit_before_any_change(self):
    # A device check; under XLA (jit_compile, Keras's default on a GPU),
    # which compiles asserts to nothing, it must still hold.
    batch = batches(1)[0]
    for jit_compile, labels, bad, row in ((False, [0, 2, 3, 1], 3, 2),
                                          (True, [1, -1, 0, 2], -1, 1)):
      with self.subTest(jit_compile=jit_compile):
        model = mpl_model(jit_compile=jit_compile)
        fails(self, model, dict(batch, labels=tf.constant(labels, tf.int64)),
              tf.errors.InvalidArgumentError,
              rf'labels must be class ids in \[0, {CLASSES}\).* has label\] '
              rf'\[{bad}\] \[at row\] \[{row}\]')


class ImagesTest(tf.test.TestCase):

  def test_images_of_two_dtypes_or_shapes_or_not_images(self):
    batch = batches(1)[0]
    x_l, y_l, x_ori, x_aug = (batch[k] for k in keras_model.BATCH_KEYS)
    one_dtype = r'one dtype and one example shape.*in this order'
    not_images = r'not images.*Is the batch in another order\?'
    model = mpl_model()
    for name, bad, pattern in (
        ('two dtypes', dict(batch, labeled_images=tf.cast(x_l, tf.float32)),
         rf'labeled_images is float32 of shape \[{LABELED}, {DIM}\] and '
         rf'unlabeled_images_ori float64 .*{one_dtype}'),
        ('two shapes', dict(batch, unlabeled_images_aug=x_aug[:, :-1]),
         rf'unlabeled_images_aug float64 of shape \[{UNLABELED}, '
         rf'{DIM - 1}\]; .*{one_dtype}'),
        ('bool', dict(batch, unlabeled_images_ori=x_ori > 0),
         rf'unlabeled_images_ori is bool .*{not_images}'),
        ('labels last', (x_l, x_ori, x_aug, y_l),
         rf'unlabeled_images_aug is int32 of shape \[{LABELED}\], '
         rf'{not_images}'),
        ('labels first', (y_l, x_l, x_ori, x_aug),
         rf'labeled_images is int32 of shape \[{LABELED}\], {not_images}'),
        ('unlabeled first', ((x_ori, x_aug), (x_l, y_l)),
         rf'unlabeled_images_aug is int32 .*{not_images}')):
      with self.subTest(name):
        fails(self, model, bad, ValueError, pattern)


class _Subclassed(keras.Model):
  """A subclassed network: its class count is only known from images."""

  def __init__(self, classes: int):
    super().__init__(name='subclassed')
    self.dense = keras.layers.Dense(classes, dtype='float64')

  def call(self, inputs):
    return self.dense(inputs)


class NetworksTest(tf.test.TestCase):

  def test_teacher_and_student_of_two_class_counts(self):
    two_counts = (r'the teacher outputs logits for 5 classes and the student '
                  r'for 3; .* one output per class')
    with self.assertRaisesRegex(ValueError, two_counts):   # at once
      mpl_tf.MetaPseudoLabels(keras_mlp(DIM, HIDDEN, 5, 0, 'teacher'),
                              networks()[1])
    inputs = keras.Input((DIM,), dtype='float64')
    grid = keras.Model(inputs, keras.layers.Reshape((1, CLASSES))(
        keras.layers.Dense(CLASSES)(inputs)))
    with self.assertRaisesRegex(ValueError,
                                r'the student must map images to one logits '
                                r'tensor \[batch, classes\]; .*\(None, 1, 3\)'):
      mpl_tf.MetaPseudoLabels(networks()[0], grid)
    # Subclassed: at fit()'s first trace, before any step.
    teacher = _Subclassed(5)
    teacher(batches(1)[0]['labeled_images'])
    model = mpl_tf.MetaPseudoLabels(teacher, networks()[1])
    model.compile(keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.1),
                  CONFIG)
    with self.assertRaisesRegex(ValueError, two_counts):
      model.fit(dataset(batches(1)), verbose=0)
    self.assertEqual(model.step, 0)


class BackendTest(tf.test.TestCase):

  def test_another_backend_is_named_before_keras_is_imported(self):
    # KERAS_BACKEND=jax (jax is not installed here: importing Keras fails
    # inside Keras) ends with the library's message alone, and neither
    # Keras nor TensorFlow is imported to find out.
    code = ('import atexit, sys, mpl_tf\n'
            'atexit.register(lambda: print(sorted(\n'
            '    {"tensorflow", "keras"} & set(sys.modules))))\n'
            'mpl_tf.MetaPseudoLabels\n')
    run = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                         env=dict(os.environ, KERAS_BACKEND='jax'),
                         capture_output=True, text=True, timeout=60)
    self.assertEqual(run.returncode, 1, run.stderr)
    self.assertEqual(run.stdout.strip(), '[]')
    self.assertRegex(run.stderr.strip().splitlines()[-1],
                     r"^RuntimeError: mpl_tf\.MetaPseudoLabels needs the "
                     r"TensorFlow backend .* runs on 'jax' .*: set "
                     r"KERAS_BACKEND=tensorflow ")
    self.assertNotIn(f'{os.sep}keras{os.sep}', run.stderr)   # no Keras frame

  def test_the_backend_is_read_as_keras_reads_it(self):
    with tempfile.TemporaryDirectory() as home:
      with open(os.path.join(home, 'keras.json'), 'w', encoding='utf-8') as f:
        json.dump({'backend': 'jax', 'floatx': 'float32'}, f)
      read = keras_backend.configured_backend
      self.assertEqual(read({'KERAS_HOME': home}), 'jax')
      self.assertEqual(read({'KERAS_HOME': home, 'KERAS_BACKEND': ''}), 'jax')
      self.assertEqual(read({'KERAS_HOME': home, 'KERAS_BACKEND': 'torch'}),
                       'torch')
      self.assertEqual(read({'KERAS_HOME': os.path.join(home, 'none')}),
                       'tensorflow')
    self.assertEqual(read(os.environ), keras.backend.backend())


class ErrorsTest(tf.test.TestCase):

  def test_a_batch_without_a_key(self):
    batch = dict(batches(1)[0])
    del batch['unlabeled_images_aug']
    with self.assertRaisesRegex(ValueError, 'without unlabeled_images_aug'):
      mpl_model().fit(dataset([batch]), verbose=0)

  def _ragged_dataset(self):
    """Batches of 4 labeled and 6 unlabeled rows, then a partial one."""
    rows = {key: tf.concat([b[key] for b in batches(3)], 0)[:size]
            for key, size in (('labeled_images', 10), ('labels', 10),
                              ('unlabeled_images_ori', 15),
                              ('unlabeled_images_aug', 15))}
    labeled = tf.data.Dataset.from_tensor_slices(
        (rows['labeled_images'], rows['labels'])).batch(LABELED)
    unlabeled = tf.data.Dataset.from_tensor_slices(
        (rows['unlabeled_images_ori'], rows['unlabeled_images_aug'])
    ).batch(UNLABELED)
    return tf.data.Dataset.zip((labeled, unlabeled))

  def test_batches_of_unknown_size(self):
    with self.assertRaisesRegex(ValueError, 'drop_remainder=True'):
      mpl_model().fit(self._ragged_dataset(), verbose=0)

  def test_a_partial_last_batch(self):
    model = mpl_model(labeled_batch_size=LABELED,
                      unlabeled_batch_size=UNLABELED)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                'drop_remainder=True'):
      model.fit(self._ragged_dataset(), verbose=0)
    self.assertEqual(model.step, 2)   # the two whole batches

  def test_a_batch_of_another_size(self):
    data = dataset(batches(1))
    with self.assertRaisesRegex(ValueError, 'is not 8 rows'):
      mpl_model(labeled_batch_size=8).fit(data, verbose=0)

  def test_another_backend(self):
    # (Keras's other backends are not installed here: with them Keras itself
    # fails to import, so the check is tested directly.)
    with self.assertRaisesRegex(RuntimeError, 'KERAS_BACKEND=tensorflow'):
      keras_model.check_backend('jax')
    keras_model.check_backend('tensorflow')
