"""Tests of mpl_tf.data: the record schema and the offline splits.

Views and tf.data pipelines are tested in test_pipeline.py.

The offline 'digits' set is prepared once per class into a temporary
directory with a small configuration, so the file runs in seconds on a CPU.
"""

import dataclasses
import os
import tempfile

import numpy as np
import tensorflow as tf

from mpl_tf import config as config_lib
from mpl_tf.data import offline
from mpl_tf.data import record_checks
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

  def test_parse_without_image_size_gives_variable_shape(self):
    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape([5, 7, 3])
    serialized = records.serialize_example(image, 1)
    parsed, _ = records.parse_example(tf.constant(serialized), None)
    self.assertAllEqual(parsed, image)
    spec = tf.data.Dataset.from_tensors(serialized).map(
        lambda s: records.parse_example(s, None)).element_spec
    self.assertEqual(spec[0].shape.as_list(), [None, None, 3])

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
    with self.assertRaisesRegex(
        FileNotFoundError, "'cifar10' is not prepared.*python prepare.py"):
      offline.ensure_prepared(data_config)

  def test_manifest_names_the_dataset_and_its_rule(self):
    self.assertEqual(self.manifest['dataset'], 'digits')
    self.assertEqual(self.manifest['source'], 'digits')
    self.assertEqual(self.manifest['split_rule'], 'custom')
    self.assertEqual(self.manifest['split_params']['labeled_per_class'], 5)
    self.assertEqual(self.manifest['image_size'], 32)

  def test_smaller_image_size_is_the_2x2_mean_and_is_redrawn(self):
    full, labels = offline.load_source('digits')
    half, half_labels = offline.load_source('digits', image_size=16)
    expected = full.reshape(-1, 16, 2, 16, 2, 3).astype(np.float64).mean(
        axis=(2, 4))
    self.assertEqual(half.shape, (len(full), 16, 16, 3))
    np.testing.assert_array_equal(half_labels, labels)
    self.assertLessEqual(np.abs(half - expected).max(), 0.5 + 1e-6)
    # A set prepared at 32 pixels is not reused for 16, nor the reverse.
    data_config = dataclasses.replace(
        self.data_config, data_dir=os.path.join(self.get_temp_dir(), 'd'))
    self.assertEqual(offline.ensure_prepared(data_config)['image_size'], 32)
    small = dataclasses.replace(data_config, image_size=16)
    manifest = offline.ensure_prepared(small)
    self.assertEqual(manifest['image_size'], 16)
    self.assertEqual(manifest['counts'], self.manifest['counts'])
    self.assertEqual(offline.ensure_prepared(data_config)['image_size'], 32)
    with self.assertRaisesRegex(ValueError, '--image_size between 8 and 32'):
      offline.ensure_prepared(dataclasses.replace(data_config, image_size=40))

  def test_prepared_elsewhere_matches_dataset_then_source(self):
    for key in ('dataset', 'source'):  # 'source' only in older manifests.
      with self.subTest(key):
        data_dir = os.path.join(self.get_temp_dir(), key)
        records.write_manifest(data_dir, {key: 'cifar10_4k', 'counts': {}})
        data_config = config_lib.DataConfig(dataset='cifar10_4k',
                                            data_dir=data_dir)
        self.assertEqual(offline.ensure_prepared(data_config)[key],
                         'cifar10_4k')
    data_config = config_lib.DataConfig(dataset='svhn_1k', data_dir=data_dir)
    with self.assertRaisesRegex(FileNotFoundError,
                                "a manifest for 'cifar10_4k'"):
      offline.ensure_prepared(data_config)

  def test_prepared_records_pass_the_check(self):
    counts = record_checks.check_dataset(self.data_config.data_dir,
                                         self.manifest)
    self.assertEqual(counts, self.manifest['counts'])

  def test_too_many_labels_per_class_is_a_clear_error(self):
    with self.assertRaisesRegex(ValueError, 'labeled_per_class=500.*class'):
      offline.prepare(self.get_temp_dir(), 'digits', labeled_per_class=500,
                      num_validation=0, num_test=0, seed=0)

  def test_unknown_source_is_a_clear_error(self):
    with self.assertRaisesRegex(ValueError, 'Unknown offline source'):
      offline.load_source('cifar10')


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
