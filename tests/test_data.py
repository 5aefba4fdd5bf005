"""Tests of mpl_tf.data: the record schema, offline splits, views, pipelines.

The offline 'digits' set is prepared once per class into a temporary
directory with a small configuration, so the file runs in seconds on a CPU.
"""

import dataclasses
import os
import tempfile

import numpy as np
import tensorflow as tf

from mpl_tf import config as config_lib
from mpl_tf.data import augment
from mpl_tf.data import offline
from mpl_tf.data import pipeline
from mpl_tf.data import records

_SMALL_DIGITS = dict(dataset='digits', labeled_per_class=5,
                     num_validation=100, num_test=200, split_seed=3)


def _read_split(data_dir, split, image_size=32, channels=3):
  dataset = tf.data.TFRecordDataset(records.split_files(data_dir, split))
  dataset = dataset.map(
      lambda s: records.parse_example(s, image_size, channels))
  images, labels = [], []
  for image, label in dataset:
    images.append(image.numpy())
    labels.append(label.numpy())
  return np.stack(images), np.array(labels)


class RecordsTest(tf.test.TestCase):

  def test_round_trip_gives_back_images_and_labels(self):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=[7, 8, 8, 3], dtype=np.uint8)
    labels = rng.integers(0, 5, size=[7])
    out_dir = self.get_temp_dir()
    paths = records.write_split(out_dir, 'test', images, labels, num_shards=2)
    self.assertEqual([os.path.basename(p) for p in paths],
                     ['test-00000-of-00002.tfrecord',
                      'test-00001-of-00002.tfrecord'])
    self.assertEqual(records.split_files(out_dir, 'test'), sorted(paths))
    self.assertEmpty([f for f in os.listdir(out_dir) if '.tmp' in f])
    read_images, read_labels = _read_split(out_dir, 'test', image_size=8)
    self.assertAllEqual(read_images, images)
    self.assertAllEqual(read_labels, labels)
    self.assertEqual(read_labels.dtype, np.int32)

  def test_parse_gives_static_shape(self):
    serialized = records.serialize_example(np.zeros([8, 8, 3], np.uint8), 2)
    image, label = records.parse_example(tf.constant(serialized), 8)
    self.assertEqual(image.shape, [8, 8, 3])
    self.assertEqual(image.dtype, tf.uint8)
    self.assertEqual(label.dtype, tf.int32)

  def test_missing_split_and_manifest_name_the_directory(self):
    empty_dir = self.get_temp_dir()
    with self.assertRaisesRegex(FileNotFoundError, "'labeled'.*Prepare"):
      records.split_files(empty_dir, 'labeled')
    with self.assertRaisesRegex(FileNotFoundError, 'manifest.json'):
      records.read_manifest(os.path.join(empty_dir, 'nothing_here'))

  def test_manifest_round_trip(self):
    data_dir = self.get_temp_dir()
    manifest = {'source': 'x', 'counts': {'test': 3}, 'mean': [1.5]}
    records.write_manifest(data_dir, manifest)
    self.assertEqual(records.read_manifest(data_dir), manifest)


class OfflineTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.temporary = tempfile.TemporaryDirectory()
    cls.data_config = config_lib.DataConfig(
        data_dir=os.path.join(cls.temporary.name, 'digits'), **_SMALL_DIGITS)
    cls.manifest = offline.ensure_prepared(cls.data_config)

  @classmethod
  def tearDownClass(cls):
    cls.temporary.cleanup()
    super().tearDownClass()

  def test_split_counts_and_class_balance(self):
    manifest = self.manifest
    self.assertEqual(manifest['num_classes'], 10)
    self.assertEqual(manifest['counts'],
                     {'labeled': 50, 'unlabeled': 1797 - 350,
                      'validation': 100, 'test': 200})
    self.assertAllEqual(manifest['class_counts']['labeled'], [5] * 10)
    for split, count in manifest['counts'].items():
      images, labels = _read_split(self.data_config.data_dir, split)
      self.assertEqual(images.shape, (count, 32, 32, 3))
      self.assertAllEqual(np.bincount(labels, minlength=10),
                          manifest['class_counts'][split])

  def test_splits_are_disjoint_and_cover_the_source(self):
    indices = self.manifest['source_indices']
    all_indices = np.concatenate([indices[s] for s in records.SPLITS])
    self.assertLen(np.unique(all_indices), len(all_indices))
    self.assertLen(all_indices, 1797)
    _, source_labels = offline.load_source('digits')
    _, labeled = _read_split(self.data_config.data_dir, 'labeled')
    self.assertAllEqual(labeled, source_labels[indices['labeled']])

  def test_normalisation_uses_training_images(self):
    images, _ = offline.load_source('digits')
    indices = self.manifest['source_indices']
    train = images[indices['labeled'] + indices['unlabeled']]
    self.assertAllClose(self.manifest['mean'],
                        train.reshape(-1, 3).mean(axis=0))
    self.assertAllClose(self.manifest['std'], train.reshape(-1, 3).std(axis=0))

  def test_ensure_prepared_reuses_a_matching_manifest(self):
    manifest_path = os.path.join(self.data_config.data_dir, 'manifest.json')
    before = os.stat(manifest_path).st_mtime_ns
    self.assertEqual(offline.ensure_prepared(self.data_config), self.manifest)
    self.assertEqual(os.stat(manifest_path).st_mtime_ns, before)

  def test_ensure_prepared_redraws_on_another_seed(self):
    data_config = dataclasses.replace(
        self.data_config, data_dir=os.path.join(self.get_temp_dir(), 'd'),
        split_seed=4)
    manifest = offline.ensure_prepared(data_config)
    self.assertEqual(manifest['seed'], 4)
    self.assertNotEqual(manifest['source_indices']['test'],
                        self.manifest['source_indices']['test'])

  def test_unprepared_non_offline_dataset_says_how_to_prepare(self):
    data_dir = os.path.join(self.get_temp_dir(), 'cifar10')
    data_config = config_lib.DataConfig(dataset='cifar10', data_dir=data_dir)
    with self.assertRaisesRegex(FileNotFoundError,
                                "'cifar10' is not prepared.*write_split"):
      offline.ensure_prepared(data_config)

  def test_too_many_labels_per_class_is_a_clear_error(self):
    with self.assertRaisesRegex(ValueError, 'labeled_per_class=500.*class'):
      offline.prepare(self.get_temp_dir(), 'digits', labeled_per_class=500,
                      num_validation=0, num_test=0, seed=0)

  def test_unknown_source_is_a_clear_error(self):
    with self.assertRaisesRegex(ValueError, 'Unknown offline source'):
      offline.load_source('cifar10')

  def _config(self, **optim):
    return config_lib.Config(data=self.data_config,
                             optim=config_lib.OptimConfig(**optim))

  def test_train_batch_keys_dtypes_and_static_shapes(self):
    config = self._config(labeled_batch_size=4, uda_ratio=3)
    dataset = pipeline.train_dataset(config, self.manifest)
    expected = {'labeled_images': ([4, 32, 32, 3], tf.float32),
                'labels': ([4], tf.int32),
                'unlabeled_images_ori': ([12, 32, 32, 3], tf.float32),
                'unlabeled_images_aug': ([12, 32, 32, 3], tf.float32)}
    self.assertEqual(set(dataset.element_spec), set(expected))
    for key, (shape, dtype) in expected.items():
      self.assertEqual(dataset.element_spec[key].shape, shape)
      self.assertEqual(dataset.element_spec[key].dtype, dtype)
    batch = next(iter(dataset))
    for key, (shape, dtype) in expected.items():
      self.assertEqual(batch[key].shape, shape)
    mean, std = np.array(self.manifest['mean']), np.array(self.manifest['std'])
    for key in ('labeled_images', 'unlabeled_images_ori',
                'unlabeled_images_aug'):
      raw = batch[key].numpy() * std + mean
      self.assertBetween(raw.min(), -1e-3, 255.001)
      self.assertBetween(raw.max(), -1e-3, 255.001)

  def test_labeled_dataset(self):
    dataset = pipeline.labeled_dataset(self._config(), self.manifest, 8)
    batch = next(iter(dataset))
    self.assertEqual(set(batch), {'labeled_images', 'labels'})
    self.assertEqual(batch['labeled_images'].shape, [8, 32, 32, 3])

  def test_labeled_order_is_seeded(self):
    def first_labels(shuffle_seed):
      config = config_lib.Config(data=dataclasses.replace(
          self.data_config, shuffle_seed=shuffle_seed))
      dataset = pipeline.labeled_dataset(config, self.manifest, 50)
      return next(iter(dataset))['labels'].numpy()
    self.assertAllEqual(first_labels(1), first_labels(1))
    self.assertNotAllEqual(first_labels(1), first_labels(2))

  def test_eval_padding(self):
    dataset = pipeline.eval_dataset(self._config(), self.manifest,
                                    'validation', 64)
    self.assertEqual(dataset.element_spec['images'].shape, [64, 32, 32, 3])
    self.assertEqual(dataset.element_spec['mask'].shape, [64])
    batches = list(dataset)
    self.assertLen(batches, 2)
    mask = np.concatenate([b['mask'].numpy() for b in batches])
    self.assertEqual(mask.sum(), 100)
    self.assertAllEqual(mask, [1.0] * 100 + [0.0] * 28)
    self.assertAllEqual(batches[1]['images'][36:], tf.zeros([28, 32, 32, 3]))
    _, labels = _read_split(self.data_config.data_dir, 'validation')
    evaluated = np.concatenate([b['labels'].numpy() for b in batches])
    self.assertAllEqual(evaluated[:100], labels)


class AugmentTest(tf.test.TestCase):

  def _images(self, batch=6, size=32):
    return tf.random.uniform([batch, size, size, 3], 0.0, 255.0, seed=1)

  def _assert_image_like(self, augmented, images):
    self.assertEqual(augmented.shape, images.shape)
    self.assertEqual(augmented.dtype, tf.float32)
    self.assertGreaterEqual(float(tf.reduce_min(augmented)), 0.0)
    self.assertLessEqual(float(tf.reduce_max(augmented)), 255.0)

  def test_ops_keep_shape_and_range_eagerly_and_in_tf_data(self):
    data_config = config_lib.DataConfig(randaugment_magnitude=16.0)
    ops = {
        'flip_pad_crop': augment.flip_pad_crop,
        'cutout': augment.cutout,
        'rand_augment': lambda x: augment.rand_augment(x, 2, 16.0),
        'strong_view': lambda x: augment.strong_view(x, data_config),
    }
    images = self._images()
    for name, op in ops.items():
      with self.subTest(name):
        self._assert_image_like(op(images), images)
        dataset = tf.data.Dataset.from_tensors(images).repeat(2).map(
            op, num_parallel_calls=tf.data.AUTOTUNE)
        self.assertEqual(dataset.element_spec.shape, images.shape)
        for augmented in dataset:
          self._assert_image_like(augmented, images)

  def test_flip_pad_crop_without_pad_or_flip_is_identity(self):
    images = self._images()
    self.assertAllEqual(augment.flip_pad_crop(images, pad=0, flip=False),
                        images)

  def test_crop_is_a_shifted_window_with_fill(self):
    ramp = tf.reshape(tf.range(1.0, 65.0), [1, 8, 8, 1])
    cropped = augment.flip_pad_crop(tf.tile(ramp, [20, 1, 1, 3]), pad=2,
                                    flip=False).numpy()
    for image in cropped[..., 0]:
      inside = image != 128.0
      rows, columns = np.nonzero(inside)
      window = image[rows.min():rows.max() + 1, columns.min():columns.max() + 1]
      self.assertTrue(np.all(window != 128.0))
      # Consecutive pixels of the ramp stay consecutive: a pure shift.
      self.assertAllEqual(np.diff(window, axis=1), np.ones_like(window[:, 1:]))

  def test_cutout_fills_a_square_of_the_right_size(self):
    images = tf.zeros([50, 32, 32, 3])
    filled = augment.cutout(images, size=16).numpy()
    self.assertAllEqual(np.unique(filled), [0.0, 128.0])
    saw_full_square = False
    for image in filled:
      rows, columns = np.nonzero(image[..., 0] == 128.0)
      height = rows.max() - rows.min() + 1
      width = columns.max() - columns.min() + 1
      self.assertLessEqual(max(height, width), 16)
      self.assertLen(rows, height * width)  # A filled rectangle.
      self.assertTrue(np.all(image[..., 0] == image[..., 2]))
      saw_full_square |= (height == 16 and width == 16)
    self.assertTrue(saw_full_square)

  def test_cutout_at_the_centre_and_corner(self):
    images = tf.zeros([2, 32, 32, 3])
    filled = augment._cutout_at(images, tf.constant([16, 0]),
                                tf.constant([16, 0]), 16, 128.0).numpy()
    expected = np.zeros([2, 32, 32, 3])
    expected[0, 8:24, 8:24] = 128.0
    expected[1, 0:8, 0:8] = 128.0
    self.assertAllEqual(filled, expected)

  def test_normalize(self):
    images = tf.fill([2, 4, 4, 3], 100.0)
    normalised = augment.normalize(images, [100.0, 50.0, 0.0], [1.0, 2.0, 4.0])
    self.assertAllClose(normalised[0, 0, 0], [0.0, 25.0, 25.0])

  def test_magnitude_mapping(self):
    self.assertAllClose(augment.keras_cv_magnitude(5.0), 0.5)
    self.assertAllClose(augment.keras_cv_magnitude(16.0), 1.0)


class Mnist5kTest(tf.test.TestCase):

  def test_load_source(self):
    images, labels = offline.load_source('mnist5k')
    self.assertEqual(images.shape, (5000, 32, 32, 3))
    self.assertEqual(images.dtype, np.uint8)
    self.assertAllEqual(np.unique(labels), np.arange(10))
    # Zero border from padding 28x28 to 32x32, gray repeated to 3 channels.
    self.assertEqual(images[:, :2].max(), 0)
    self.assertAllEqual(images[..., 0], images[..., 1])
    self.assertGreater(images.max(), 200)


if __name__ == '__main__':
  tf.test.main()
