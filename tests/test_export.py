"""Tests of the serving contract: export, reload, prediction and evaluation.

One tiny WRN-10-1 is trained nowhere: its weights are perturbed away from
the initialisation and written to a CheckpointManager directory, as the
training loop does, so a test passes only if the export restored them. Two
exports are made once per class, one of fixed-size ('pad_crop') data and one
of ImageNet-style ('inception') data, and every test reads them.
"""

import os
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf

from mpl_tf import checkpoints
from mpl_tf import config as config_lib
from mpl_tf import evaluate
from mpl_tf import export
from mpl_tf import export_format
from mpl_tf import serving as serving_lib
from mpl_tf.data import augment
from mpl_tf.data import records
from mpl_tf.models import build_model
from tests.testing import png_announcing

_NUM_CLASSES = 10
_SIZE = 32
_MEAN = [125.3, 123.0, 113.9]
_STD = [63.0, 62.1, 66.7]
_NAMES = [f'class_{i}' for i in range(_NUM_CLASSES)]
_TOLERANCE = 1e-5


def _manifest(image_size=_SIZE, counts=None):
  return {'dataset': 'fake', 'num_classes': _NUM_CLASSES,
          'image_size': image_size, 'channels': 3, 'mean': _MEAN,
          'std': _STD, 'class_names': _NAMES, 'counts': counts or {}}


def _config(data_dir, crop='pad_crop', model='wrn-10-1'):
  return config_lib.Config(
      data=config_lib.DataConfig(dataset='fake', data_dir=data_dir,
                                 image_size=_SIZE, crop=crop),
      model=config_lib.ModelConfig(name=model),
      run=config_lib.RunConfig(eval_batch_size=4))


def _perturbed_model(seed, name='ema_student'):
  """A WRN-10-1 whose weights (and batch-norm statistics) are not the init."""
  model = build_model(config_lib.ModelConfig(name='wrn-10-1'), _NUM_CLASSES,
                      _SIZE, name)
  rng = np.random.default_rng(seed)
  for variable in model.weights:
    value = variable.numpy()
    # Moderate changes keep the logits O(1), where float32 agrees to 1e-5.
    value = value * rng.uniform(0.7, 1.3, value.shape)
    if 'moving_variance' not in variable.path:
      value = value + rng.normal(0.0, 0.05, value.shape)
    variable.assign(value.astype(np.float32))
  return model


def _save(manager, seed, number):
  """Saves a perturbed EMA student (and a student) as ckpt-<number>."""
  ema_student = _perturbed_model(seed)
  manager_checkpoint = tf.train.Checkpoint(
      ema_student=ema_student, student=_perturbed_model(seed + 100, 'student'),
      step=tf.Variable(number, dtype=tf.int64))
  path = tf.train.CheckpointManager(
      manager_checkpoint, manager.directory,
      max_to_keep=5).save(checkpoint_number=number)
  return ema_student, path


def _expected(model, images):
  """The network on the normalised pixels: what the export must compute."""
  outputs = model(augment.normalize(images, _MEAN, _STD), training=False)
  logits = tf.cast(outputs, tf.float32).numpy()
  return {'logits': logits,
          'probabilities': tf.nn.softmax(logits).numpy(),
          'classes': np.argmax(logits, -1)}


def _random_images(seed, shape):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _write_file(path, image, kind):
  encode = tf.io.encode_png if kind == 'png' else tf.io.encode_jpeg
  tf.io.write_file(path, encode(image))
  return path


class ExportTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.temporary = tempfile.TemporaryDirectory()
    root = cls.temporary.name
    cls.checkpoint_dir = os.path.join(root, 'run', 'checkpoints')
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(), cls.checkpoint_dir, max_to_keep=5)
    cls.model, cls.checkpoint = _save(manager, seed=1, number=10)
    cls.fixed_dir = os.path.join(root, 'fixed')
    cls.variable_dir = os.path.join(root, 'variable')
    cls.config = _config(cls.fixed_dir)
    cls.inception_config = _config(cls.variable_dir, crop='inception')
    cls.export_dir = export.export_saved_model(
        cls.config, _manifest(), cls.checkpoint,
        os.path.join(root, 'exports', 'fixed', '1'))
    cls.inception_export_dir = export.export_saved_model(
        cls.inception_config, _manifest(image_size=None), cls.checkpoint,
        os.path.join(root, 'exports', 'inception', '1'))
    cls.serving = serving_lib.load_serving(cls.export_dir)
    cls.inception_serving = serving_lib.load_serving(cls.inception_export_dir)

  @classmethod
  def tearDownClass(cls):
    cls.temporary.cleanup()
    super().tearDownClass()

  def _new_directory(self):
    # absltest's create_tempdir needs parsed flags, which pytest never does.
    return tempfile.mkdtemp(dir=self.temporary.name)

  def test_signature_matches_the_keras_model(self):
    signature = tf.saved_model.load(self.export_dir).signatures[
        export_format.SIGNATURE_KEY]
    inputs = signature.structured_input_signature[1]
    self.assertEqual(inputs['images'].dtype, tf.uint8)
    self.assertEqual(inputs['images'].shape.as_list(), [None, None, None, 3])
    self.assertEqual(
        {k: v.dtype for k, v in signature.structured_outputs.items()},
        {'logits': tf.float32, 'probabilities': tf.float32,
         'classes': tf.int64})
    images = _random_images(0, (5, _SIZE, _SIZE, 3))
    outputs = signature(images=tf.constant(images))
    expected = _expected(self.model, images)
    self.assertAllClose(outputs['logits'], expected['logits'],
                        atol=_TOLERANCE, rtol=_TOLERANCE)
    self.assertAllClose(outputs['probabilities'], expected['probabilities'],
                        atol=_TOLERANCE, rtol=_TOLERANCE)
    self.assertAllEqual(outputs['classes'], expected['classes'])
    # The restored weights, not the initialisation: a fresh network differs.
    fresh = build_model(self.config.model, _NUM_CLASSES, _SIZE, 'fresh')
    self.assertNotAllClose(_expected(fresh, images)['logits'],
                           expected['logits'])

  def test_metadata_describes_the_contract(self):
    metadata = self.serving.metadata
    self.assertEqual(metadata['class_names'], _NAMES)
    self.assertEqual(metadata['image_size'], _SIZE)
    self.assertEqual(metadata['crop'], 'pad_crop')
    self.assertEqual(metadata['mean'], _MEAN)
    self.assertEqual(metadata['std'], _STD)
    self.assertEqual(metadata['checkpoint'], self.checkpoint)
    self.assertEqual(metadata['config']['model']['name'], 'wrn-10-1')
    self.assertEqual(self.inception_serving.metadata['crop'], 'inception')

  def test_inception_export_centre_crops_any_size(self):
    for seed, shape in ((1, (2, 40, 56, 3)), (2, (1, 20, 24, 3)),
                        (3, (3, 70, 33, 3))):
      images = _random_images(seed, shape)
      cropped = tf.stack([augment.center_crop(image, _SIZE, 0.875)
                          for image in tf.constant(images)])
      expected = _expected(self.model, cropped)
      outputs = self.inception_serving(images)
      self.assertAllClose(outputs['logits'], expected['logits'],
                          atol=_TOLERANCE, rtol=_TOLERANCE)
      self.assertAllEqual(outputs['classes'], expected['classes'])

  def test_predict_files_png_jpeg_and_grayscale(self):
    directory = self._new_directory()
    images = _random_images(4, (3, _SIZE, _SIZE, 3))
    paths = [
        _write_file(os.path.join(directory, 'a.png'), images[0], 'png'),
        _write_file(os.path.join(directory, 'b.jpg'), images[1], 'jpeg'),
        _write_file(os.path.join(directory, 'gray.png'), images[2][..., :1],
                    'png')]
    decoded = np.stack([records.decode_image(tf.io.read_file(p)).numpy()
                        for p in paths])
    self.assertAllEqual(decoded[2][..., 0], decoded[2][..., 2])
    expected = _expected(self.model, decoded)
    self.assertEqual(
        serving_lib.expand_file_patterns(
            f'{paths[2]}, {os.path.join(directory, "*.png")}'),
        [paths[2], paths[0], paths[2]])
    with self.assertRaisesRegex(ValueError, 'No file matches'):
      serving_lib.expand_file_patterns(os.path.join(directory, '*.gif'))
    results = serving_lib.predict_files(self.export_dir, paths)
    self.assertEqual([r['file'] for r in results], paths)
    self.assertEqual([r['class'] for r in results],
                     expected['classes'].tolist())
    self.assertEqual([r['class_name'] for r in results],
                     [_NAMES[c] for c in expected['classes']])
    for result, row in zip(results, expected['probabilities']):
      self.assertAllClose(result['probability'], row[result['class']],
                          atol=_TOLERANCE)

  def test_predict_files_batches_by_size_and_keeps_order(self):
    directory = self._new_directory()
    shapes = [(40, 56), (33, 33), (40, 56), (64, 48), (33, 33)]
    paths = [_write_file(os.path.join(directory, f'{i}.png'),
                         _random_images(10 + i, shape + (3,)), 'png')
             for i, shape in enumerate(shapes)]
    results = serving_lib.predict_files(self.inception_serving, paths,
                                        batch_size=3)
    for path, result in zip(paths, results):
      alone = serving_lib.predict_files(self.inception_serving, [path])[0]
      self.assertEqual(result['file'], path)
      self.assertEqual(result['class'], alone['class'])
      self.assertAllClose(result['probability'], alone['probability'],
                          atol=_TOLERANCE)

  def test_predict_files_names_bad_files(self):
    directory = self._new_directory()
    missing = os.path.join(directory, 'missing.png')
    with self.assertRaisesRegex(ValueError, 'missing.png'):
      serving_lib.predict_files(self.serving, [missing])
    garbage = os.path.join(directory, 'garbage.png')
    tf.io.write_file(garbage, b'not an image at all')
    with self.assertRaisesRegex(ValueError, 'garbage.png.*decode'):
      serving_lib.predict_files(self.serving, [garbage])
    large = _write_file(os.path.join(directory, 'large.png'),
                        _random_images(5, (40, 40, 3)), 'png')
    with self.assertRaisesRegex(ValueError, 'large.png.*40x40.*32x32'):
      serving_lib.predict_files(self.serving, [large])

  def test_predict_files_sizes_each_file_from_its_header_first(self):
    # Issue 22: a 1.1 MB PNG was decoded to 1.2 GB before its size was
    # checked. Refused from the header now, by the pixel limit or by the
    # size a 'pad_crop' export takes, and the decoder is never called.
    directory = self._new_directory()
    huge = os.path.join(directory, 'huge.png')
    tf.io.write_file(huge, png_announcing(20_000, 20_000))
    large = _write_file(os.path.join(directory, 'large.png'),
                        _random_images(5, (40, 40, 3)), 'png')
    with mock.patch.object(records, 'decode_image',
                           side_effect=AssertionError('decoded')):
      with self.assertRaisesRegex(
          ValueError, 'huge.png.*20000x20000 pixels.*limit of 89,478,485 '
                      'pixels.*refused before decoding'):
        serving_lib.predict_files(self.inception_serving, [huge])
      with self.assertRaisesRegex(ValueError, 'large.png.*40x40.*32x32'):
        serving_lib.predict_files(self.serving, [large])

  def test_raw_signature_rejects_wrong_inputs(self):
    signature = self.serving.signature
    images = _random_images(6, (2, _SIZE, _SIZE, 3))
    with self.assertRaises((tf.errors.InvalidArgumentError, TypeError,
                            ValueError)):
      signature(images=tf.constant(images, tf.float32))
    bad_shapes = {
        'rank 3': images[0],
        'one channel': images[..., :1],
        'four channels': np.concatenate([images, images[..., :1]], -1),
        'wrong size': _random_images(7, (2, 40, 40, 3)),
        'empty': images[:0],
    }
    for name, bad in bad_shapes.items():
      with self.subTest(name):
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                    r'images|\[\?,\?,\?,3\]'):
          signature(images=tf.constant(bad))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                r'\[N, 32, 32, 3\]'):
      signature(images=tf.constant(bad_shapes['wrong size']))
    # Any size is fine for 'inception' exports, but not any rank or depth.
    inception_signature = self.inception_serving.signature
    for name in ('rank 3', 'one channel', 'four channels', 'empty'):
      with self.subTest(f'inception, {name}'):
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                    r'images|\[\?,\?,\?,3\]'):
          inception_signature(images=tf.constant(bad_shapes[name]))

  def test_checked_call_explains_wrong_inputs(self):
    images = _random_images(8, (2, _SIZE, _SIZE, 3))
    cases = {
        'are float32.*uint8': images.astype(np.float32),
        r'shape \[32, 32, 3\].*batch axis': images[0],
        r'shape \[2, 32, 32, 1\].*grayscale': images[..., :1],
        'empty batch': images[:0],
        '40x40.*does not resize': _random_images(9, (1, 40, 40, 3)),
    }
    for message, bad in cases.items():
      with self.subTest(message):
        with self.assertRaisesRegex(ValueError, message):
          self.serving(bad)

  def test_checkpoint_resolution_and_errors(self):
    # A directory or a run's model_dir means its latest checkpoint.
    self.assertEqual(checkpoints.resolve_checkpoint(self.checkpoint_dir),
                     self.checkpoint)
    self.assertEqual(
        checkpoints.resolve_checkpoint(os.path.dirname(self.checkpoint_dir)),
        self.checkpoint)
    self.assertEqual(
        checkpoints.resolve_checkpoint(self.checkpoint + '.index'),
        self.checkpoint)
    # A model_dir with a best-on-validation EMA student means that one.
    run = self._new_directory()
    _save(tf.train.CheckpointManager(
        tf.train.Checkpoint(), os.path.join(run, 'checkpoints'), 5),
          seed=30, number=40)
    best = tf.train.CheckpointManager(
        tf.train.Checkpoint(ema_student=self.model),
        os.path.join(run, 'checkpoints', 'best'), max_to_keep=1,
        checkpoint_name='best').save(checkpoint_number=20)
    self.assertEqual(checkpoints.resolve_checkpoint(run), best)
    self.assertEqual(
        checkpoints.resolve_checkpoint(os.path.join(run, 'checkpoints')),
        os.path.join(run, 'checkpoints', 'ckpt-40'))
    missing = os.path.join(self.checkpoint_dir, 'ckpt-999')
    with self.assertRaisesRegex(FileNotFoundError, 'ckpt-999.*prefix'):
      checkpoints.resolve_checkpoint(missing)
    empty = self._new_directory()
    with self.assertRaisesRegex(FileNotFoundError, 'No checkpoint in'):
      checkpoints.resolve_checkpoint(empty)
    target = os.path.join(empty, 'never')
    with self.assertRaises(FileNotFoundError):
      export.export_saved_model(self.config, _manifest(), missing, target)
    self.assertEqual(os.listdir(empty), [])

    student_only = tf.train.Checkpoint(
        student=_perturbed_model(3, 'student')).write(
            os.path.join(empty, 'student_only'))
    with self.assertRaisesRegex(ValueError,
                                "no 'ema_student' .*holds: student"):
      checkpoints.restore_model(self.config, _manifest(), student_only)
    wider = _config(self.fixed_dir, model='wrn-10-2')
    with self.assertRaisesRegex(ValueError, 'does not fit.*wrn-10-2'):
      checkpoints.restore_model(wider, _manifest(), self.checkpoint)

  def test_export_replaces_atomically_and_leaves_no_temporary(self):
    parent = self._new_directory()
    target = os.path.join(parent, '1')
    manager = self._new_directory()
    first_model, first = _save(tf.train.CheckpointManager(
        tf.train.Checkpoint(), manager, 5), seed=20, number=1)
    export.export_saved_model(self.config, _manifest(), first, target)
    second_model, _ = _save(tf.train.CheckpointManager(
        tf.train.Checkpoint(), manager, 5), seed=21, number=2)
    # The directory resolves to its latest checkpoint, ckpt-2.
    export.export_saved_model(self.config, _manifest(), manager, target)
    self.assertEqual(os.listdir(parent), ['1'])
    images = _random_images(11, (3, _SIZE, _SIZE, 3))
    outputs = serving_lib.load_serving(target)(images)
    self.assertAllClose(outputs['logits'],
                        _expected(second_model, images)['logits'],
                        atol=_TOLERANCE, rtol=_TOLERANCE)
    self.assertNotAllClose(outputs['logits'],
                           _expected(first_model, images)['logits'])

    # A failed export leaves the previous one and no temporary behind.
    with mock.patch.object(tf.saved_model, 'save',
                           side_effect=RuntimeError('disk full')):
      with self.assertRaisesRegex(RuntimeError, 'disk full'):
        export.export_saved_model(self.config, _manifest(), first, target)
    self.assertEqual(os.listdir(parent), ['1'])
    self.assertAllClose(serving_lib.load_serving(target)(images)['logits'],
                        outputs['logits'])

    # Anything but an export is never replaced.
    notes = os.path.join(parent, 'notes')
    os.makedirs(notes)
    with open(os.path.join(notes, 'results.txt'), 'w') as f:
      f.write('keep me')
    with self.assertRaisesRegex(ValueError, 'refusing'):
      export.export_saved_model(self.config, _manifest(), first, notes)
    self.assertEqual(os.listdir(notes), ['results.txt'])
    self.assertEqual(sorted(os.listdir(parent)), ['1', 'notes'])

  def test_saved_model_evaluates_like_the_checkpoint(self):
    rng = np.random.default_rng(12)
    fixed_images = rng.integers(0, 256, (7, _SIZE, _SIZE, 3), dtype=np.uint8)
    fixed_labels = rng.integers(0, _NUM_CLASSES, 7)
    records.write_split(self.fixed_dir, 'test', fixed_images, fixed_labels)
    os.makedirs(self.variable_dir, exist_ok=True)
    sizes = [(40, 56), (33, 33), (40, 56), (64, 48), (33, 33)]
    path = os.path.join(self.variable_dir, records.shard_name('test', 0, 1))
    with tf.io.TFRecordWriter(path) as writer:
      for index, size in enumerate(sizes):
        writer.write(records.serialize_example(
            rng.integers(0, 256, size + (3,), dtype=np.uint8),
            index % _NUM_CLASSES))
    cases = (
        (self.config, _manifest(counts={'test': 7}), self.serving),
        (self.inception_config, _manifest(None, counts={'test': 5}),
         self.inception_serving))
    for config, manifest, serving in cases:
      with self.subTest(config.data.crop):
        from_checkpoint = evaluate.evaluate(config, manifest,
                                            self.checkpoint_dir, 'test')
        from_export = evaluate.evaluate_saved_model(
            serving, evaluate.eval_images(config, manifest, 'test', 3))
        self.assertEqual(
            evaluate.evaluate(config, manifest, serving.export_dir, 'test'),
            evaluate.evaluate_saved_model(
                serving, evaluate.eval_images(config, manifest, 'test')))
        self.assertEqual(from_export['count'], manifest['counts']['test'])
        self.assertEqual(from_checkpoint['count'], from_export['count'])
        for key in ('top1', 'top5', 'loss'):
          self.assertAllClose(from_export[key], from_checkpoint[key],
                              atol=1e-5, rtol=1e-5)

  def test_manifest_with_wrong_number_of_names_is_refused(self):
    manifest = dict(_manifest(), class_names=_NAMES[:3])
    with self.assertRaisesRegex(ValueError, '3 class_names for 10 classes'):
      export.export_saved_model(
          self.config, manifest, self.checkpoint,
          os.path.join(self._new_directory(), '1'))


if __name__ == '__main__':
  tf.test.main()
