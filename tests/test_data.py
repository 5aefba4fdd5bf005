"""Tests of mpl_tf.data: the record schema and the offline splits.

Views and tf.data pipelines are tested in test_pipeline.py.

The offline 'digits' set is prepared once per class into a temporary
directory with a small configuration, so the file runs in seconds on a CPU.
"""

import dataclasses
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from mpl_tf import config as config_lib
from mpl_tf.data import offline
from mpl_tf.data import prepare
from mpl_tf.data import record_checks
from mpl_tf.data import records
from tests.testing import file_hashes

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

  def test_training_never_replaces_a_data_set_it_did_not_prepare(self):
    # Issue 22: training with the flagfile's --dataset=digits and a
    # --data_dir holding a set prepared by prepare.py ('p27') replaced that
    # set by digits and exited 0. Each case below is refused, and no file
    # under the root (every set, and beside them) is added or changed.
    root = self.get_temp_dir()
    rng = np.random.default_rng(0)
    arrays = os.path.join(root, 'arrays.npz')
    np.savez(arrays, images=rng.integers(0, 256, (24, 8, 8, 3), np.uint8),
             labels=np.arange(24) % 3, test_labels=np.arange(6) % 3,
             test_images=rng.integers(0, 256, (6, 8, 8, 3), np.uint8))
    p27 = os.path.join(root, 'p27')
    prepare.prepare(prepare.PrepareConfig(
        source='npz', npz_path=arrays, split_rule='custom',
        labeled_per_class=2, validation_per_class=1, out_dir=p27))
    # A user's set named like an offline one: not drawn by training.
    named_digits = os.path.join(root, 'named_digits')
    shutil.copytree(p27, named_digits)
    manifest = records.read_manifest(named_digits)
    records.write_manifest(named_digits, {**manifest, 'dataset': 'digits'})
    ours = os.path.join(root, 'ours')
    shutil.copytree(self.data_config.data_dir, ours)
    half = os.path.join(root, 'half')   # shards and a note, no manifest
    records.write_split(half, 'labeled', np.zeros([2, 4, 4, 3], np.uint8),
                        np.arange(2))
    damaged = {name: os.path.join(root, name)
               for name in ('truncated', 'a_list', 'a_directory')}
    for name, path in damaged.items():
      shutil.copytree(ours, path)
    text = records.write_manifest(damaged['truncated'], manifest)
    for path, content in ((text, '{"dataset": "dig'),
                          (os.path.join(half, 'notes.txt'), 'mine'),
                          (os.path.join(damaged['a_list'], 'manifest.json'),
                           '["digits"]')):
      with open(path, 'w') as f:
        f.write(content)
    os.remove(os.path.join(damaged['a_directory'], 'manifest.json'))
    os.mkdir(os.path.join(damaged['a_directory'], 'manifest.json'))

    def ensure(data_dir, dataset='digits', **changes):
      return offline.ensure_prepared(dataclasses.replace(
          self.data_config, data_dir=data_dir, dataset=dataset, **changes))

    before = file_hashes(root)
    refusals = [
        (p27, 'digits', FileNotFoundError,
         r"--data_dir=\S*p27 holds a manifest for 'p27', not for "
         r"--dataset=digits.*pass --dataset=p27; .*another --data_dir"),
        (ours, 'mnist5k', FileNotFoundError,
         r"manifest for 'digits', not for --dataset=mnist5k.*"
         r"--dataset=digits"),
        (half, 'digits', FileNotFoundError,
         r'no manifest.json but holds files \(labeled-00000-of-00001'
         r'.tfrecord, notes.txt\).*another --data_dir'),
        (damaged['truncated'], 'digits', ValueError, 'not valid JSON'),
        (damaged['a_list'], 'digits', ValueError,
         'holds a JSON list, not the object of a manifest'),
        (damaged['a_directory'], 'digits', ValueError, 'cannot be read'),
    ]
    for data_dir, dataset, error, pattern in refusals:
      with self.subTest(os.path.basename(data_dir)):
        with self.assertRaisesRegex(error, pattern):
          ensure(data_dir, dataset)
        self.assertEqual(file_hashes(root), before)
    # A set of the requested name that training did not draw is used as it
    # is, whatever its split parameters: never redrawn.
    self.assertEqual(ensure(named_digits)['split_indices_file'],
                     'split_indices.npz')
    self.assertEqual(file_hashes(root), before)
    # Its own offline set, asked for with another seed, is redrawn (as
    # before); a file of the user's beside it stays, nothing is left over.
    with open(os.path.join(ours, 'notes.txt'), 'w') as f:
      f.write('mine')
    listing = sorted(os.listdir(root))
    self.assertEqual(ensure(ours, split_seed=4)['seed'], 4)
    self.assertEqual(records.read_manifest(ours)['seed'], 4)
    with open(os.path.join(ours, 'notes.txt')) as f:
      self.assertEqual(f.read(), 'mine')
    self.assertEqual(sorted(os.listdir(root)), listing)

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
