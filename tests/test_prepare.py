"""Tests of data preparation: the record schema, checks, split rules, CLI.

Split rules run on synthetic label arrays of the real data sets' sizes (pure
numpy, milliseconds). TFDS is mocked with `tfds.testing.mock_data` (and its
builders told they are prepared), folders and .npz files are written into
temporary directories, so nothing is downloaded.
"""

import contextlib
import io
import os
import subprocess
import sys
from typing import Dict, Iterable, List, Optional, Tuple
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import prepare as prepare_command
from mpl_tf.data import prepare
from mpl_tf.data import record_checks
from mpl_tf.data import records
from mpl_tf.data import splits
from mpl_tf.data import tfds_source

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SVHN_TRAIN_CLASS_SIZES = [4948, 13861, 10585, 8497, 7458, 6882, 5727, 5595,
                           5045, 4659]


def _write_encoded(out_dir: str, split: str,
                   examples: Iterable[Tuple[bytes, int]], num_records: int,
                   shard_size: Optional[int] = None,
                   num_classes: Optional[int] = None) -> List[str]:
  """Writes (encoded bytes, label) pairs as one split; returns shard paths.

  What a source whose files are already PNG or JPEG bytes would write; the
  library's writers encode arrays themselves.
  """
  num_shards = records.num_shards_for(num_records, shard_size)
  with records.SplitWriter(out_dir, split, num_records, num_shards,
                           num_classes) as writer:
    for encoded, label in examples:
      writer.write(encoded, label)
  return writer.paths


def _check_disjoint(indices: Dict[str, np.ndarray],
                    allow_overlap=(('labeled', 'unlabeled'),)) -> None:
  """ValueError if two splits share an index, except the allowed pairs.

  An assertion of the split rules, checked here against every rule's output.
  """
  names = sorted(indices)
  allowed = {frozenset(pair) for pair in allow_overlap}
  size = 1 + max((int(i.max()) for i in indices.values() if i.size),
                 default=0)
  for position, first in enumerate(names):
    in_first = np.zeros(size, bool)
    in_first[indices[first]] = True
    for second in names[position + 1:]:
      if frozenset((first, second)) in allowed:
        continue
      shared = indices[second][in_first[indices[second]]]
      if shared.size:
        raise ValueError(f'Splits {first!r} and {second!r} share '
                         f'{shared.size} images (e.g. index {shared[0]}).')

def _png(image):
  return tf.io.encode_png(image).numpy()


def _jpeg(image):
  return tf.io.encode_jpeg(image).numpy()


def _random_images(count, height, width, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, size=[count, height, width, channels],
                      dtype=np.uint8)


def _raw_records(data_dir, split):
  return [r.numpy() for r in
          tf.data.TFRecordDataset(records.split_files(data_dir, split))]


def _parsed(data_dir, split, image_size=None):
  return [records.parse_example(tf.constant(raw), image_size)
          for raw in _raw_records(data_dir, split)]


def _write_raw(path, serialized_records):
  with tf.io.TFRecordWriter(path) as writer:
    for serialized in serialized_records:
      writer.write(serialized)


def _run_cli(*flags):
  """(exit status, stderr) of the command with these flags."""
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(
      io.StringIO()):
    status = prepare_command.run_cli(['prepare', *flags])
  return status, stderr.getvalue()


@contextlib.contextmanager
def _mock_tfds(num_examples):
  """Random TFDS examples, and builders that believe they are prepared."""
  with tfds.testing.mock_data(num_examples=num_examples), mock.patch.object(
      tfds.core.DatasetBuilder, 'is_prepared', return_value=True):
    yield


class SchemaTest(tf.test.TestCase):

  def test_png_arrays_round_trip_with_variable_size_parse(self):
    images = [_random_images(1, 5, 7)[0], _random_images(1, 9, 4, seed=1)[0]]
    out_dir = self.get_temp_dir()
    _write_encoded(out_dir, 'test', [(_png(images[0]), 3),
                                            (_png(images[1]), 0)], 2)
    (first, first_label), (second, second_label) = _parsed(out_dir, 'test')
    self.assertEqual(first.shape, [5, 7, 3])
    self.assertAllEqual(first, images[0])
    self.assertAllEqual(second, images[1])
    self.assertEqual([int(first_label), int(second_label)], [3, 0])
    spec = tf.data.TFRecordDataset(records.split_files(out_dir, 'test')).map(
        lambda s: records.parse_example(s, None)).element_spec
    self.assertEqual(spec[0].shape.as_list(), [None, None, 3])

  def test_jpeg_bytes_are_stored_unchanged(self):
    jpeg = _jpeg(_random_images(1, 12, 10)[0])
    out_dir = self.get_temp_dir()
    _write_encoded(out_dir, 'labeled', [(jpeg, 4)], 1)
    stored = tf.train.Example.FromString(_raw_records(out_dir, 'labeled')[0])
    feature = stored.features.feature
    self.assertEqual(feature[records.IMAGE_KEY].bytes_list.value[0], jpeg)
    self.assertEqual(feature[records.LABEL_KEY].int64_list.value[0], 4)
    image, _ = _parsed(out_dir, 'labeled')[0]
    self.assertEqual(image.shape, [12, 10, 3])
    with self.assertRaises(Exception):  # A fixed size must match.
      records.parse_example(tf.constant(_raw_records(out_dir, 'labeled')[0]),
                            8)

  def test_shard_size_gives_nearly_equal_named_shards(self):
    out_dir = self.get_temp_dir()
    png = _png(_random_images(1, 4, 4)[0])
    paths = _write_encoded(out_dir, 'unlabeled',
                                  [(png, i % 3) for i in range(10)], 10,
                                  shard_size=4)
    self.assertEqual([os.path.basename(p) for p in paths],
                     [f'unlabeled-0000{i}-of-00003.tfrecord'
                      for i in range(3)])
    sizes = [sum(1 for _ in tf.data.TFRecordDataset(p)) for p in paths]
    self.assertEqual(sizes, [4, 3, 3])
    self.assertEmpty([f for f in os.listdir(out_dir) if '.tmp' in f])

  def test_writers_reject_bad_input_naming_the_fix(self):
    out_dir = self.get_temp_dir()
    images = _random_images(3, 4, 4)
    cases = [
        (images.astype(np.float32), [0, 1, 2], {}, 'uint8.*Convert'),
        (images[0], [0], {}, 'rank 4'),
        (images, [0, 1], {}, r'shape \(3,\)'),
        (images, [0, 1, 5], {'num_classes': 5}, 'label 5 is out of range'),
        (images, [0, -1, 2], {}, 'label -1 is out of range.*1-based'),
    ]
    for bad_images, labels, kwargs, message in cases:
      with self.subTest(message):
        with self.assertRaisesRegex(ValueError, message):
          records.write_split(out_dir, 'test', bad_images, np.array(labels),
                              **kwargs)
    with self.assertRaisesRegex(ValueError, 'JPEG or PNG'):
      _write_encoded(out_dir, 'test', [(b'GIF89a...', 0)], 1)
    self.assertEmpty([f for f in os.listdir(out_dir) if '.tmp' in f])


class CheckSplitTest(tf.test.TestCase):
  """Each kind of bad record is named by its shard file and index."""

  def _split_with(self, bad_record, index=2):
    data_dir = self.get_temp_dir()
    good = records.serialize_encoded(_png(_random_images(1, 8, 8)[0]), 1)
    serialized = [good] * 4
    serialized[index] = bad_record
    path = os.path.join(data_dir, records.shard_name('unlabeled', 1, 2))
    _write_raw(os.path.join(data_dir, records.shard_name('unlabeled', 0, 2)),
               [good] * 3)
    _write_raw(path, serialized)
    return data_dir, path

  def _assert_named(self, data_dir, path, message, index=2, **kwargs):
    kwargs = {'num_classes': 5, 'image_size': 8, **kwargs}
    with self.assertRaisesRegex(
        ValueError, f'{path}: record {index} {message}'):
      record_checks.check_split(data_dir, 'unlabeled', **kwargs)

  def test_good_split_passes_and_max_records_limits(self):
    data_dir, _ = self._split_with(
        records.serialize_encoded(_png(_random_images(1, 8, 8)[0]), 4))
    self.assertEqual(record_checks.check_split(data_dir, 'unlabeled', 5, 8), 7)
    self.assertEqual(record_checks.check_split(data_dir, 'unlabeled', 5, 8,
                                               max_records=5), 5)

  def test_label_out_of_range(self):
    bad = records.serialize_encoded(_png(_random_images(1, 8, 8)[0]), 7)
    self._assert_named(*self._split_with(bad), r'has label 7, outside \[0, 5\)')

  def test_wrong_image_size(self):
    bad = records.serialize_encoded(_png(_random_images(1, 8, 6)[0]), 0)
    self._assert_named(*self._split_with(bad), 'has a 8x6 image, expected 8x8')

  def test_wrong_channel_count(self):
    gray = records.serialize_encoded(_png(_random_images(1, 8, 8, 1)[0]), 0)
    self._assert_named(*self._split_with(gray),
                       'has an image with 1 channels, expected 3')

  def test_undecodable_image(self):
    bad = records.serialize_encoded(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40, 0)
    self._assert_named(*self._split_with(bad), 'has an undecodable image')

  def test_unparsable_example(self):
    self._assert_named(*self._split_with(b'not a tf.train.Example'),
                       r'is not a tf.train.Example')

  def test_corrupt_file_bytes(self):
    data_dir, path = self._split_with(
        records.serialize_encoded(_png(_random_images(1, 8, 8)[0]), 0))
    with open(path, 'rb') as f:
      content = bytearray(f.read())
    record_length = len(content) // 4
    content[record_length + record_length // 2] ^= 0xFF  # Inside record 1.
    with open(path, 'wb') as f:
      f.write(bytes(content))
    self._assert_named(data_dir, path, 'is corrupt', index=1)

  def test_check_dataset_compares_counts_with_the_manifest(self):
    data_dir, _ = self._split_with(
        records.serialize_encoded(_png(_random_images(1, 8, 8)[0]), 0))
    manifest = {'num_classes': 5, 'image_size': 8, 'channels': 3,
                'counts': {'unlabeled': 6}}
    with self.assertRaisesRegex(ValueError, 'has 7 records but manifest'):
      record_checks.check_dataset(data_dir, manifest, splits=['unlabeled'])


def _balanced_labels(num_classes, per_class, seed=0):
  labels = np.repeat(np.arange(num_classes), per_class)
  return np.random.default_rng(seed).permutation(labels)


class SplitRulesTest(tf.test.TestCase):

  def _assert_disjoint_and_cover(self, indices, num_images,
                                 unlabeled_includes_labeled=False):
    allowed = [('labeled', 'unlabeled')] if unlabeled_includes_labeled else []
    _check_disjoint(indices, allow_overlap=allowed)
    covered = np.zeros(num_images, bool)
    for split_indices in indices.values():
      covered[split_indices] = True
    self.assertTrue(covered.all())

  def test_cifar10_4k_paper(self):
    labels = _balanced_labels(10, 5000)
    indices = splits.cifar10_4k(labels, seed=0)
    self.assertEqual({k: len(v) for k, v in indices.items()},
                     {'labeled': 4000, 'validation': 5000,
                      'unlabeled': 41000, 'test': 0})
    self.assertAllEqual(np.bincount(labels[indices['labeled']]), [400] * 10)
    self.assertAllEqual(np.bincount(labels[indices['validation']]),
                        [500] * 10)
    self._assert_disjoint_and_cover(indices, 50000)
    again = splits.cifar10_4k(labels, seed=0)
    other = splits.cifar10_4k(labels, seed=1)
    for split in ('labeled', 'validation', 'unlabeled'):
      self.assertAllEqual(indices[split], again[split])
      self.assertNotAllEqual(np.sort(indices[split]), np.sort(other[split]))
    # Classes are mixed, not grouped.
    self.assertGreater(len(np.unique(labels[indices['labeled'][:20]])), 3)

  def test_cifar10_4k_released_code(self):
    labels = _balanced_labels(10, 5000)
    indices = splits.cifar10_4k(labels, seed=0, variant='released_code')
    self.assertAllEqual(indices['labeled'], np.arange(4000))
    self.assertAllEqual(indices['validation'], np.arange(45000, 50000))
    self.assertAllEqual(indices['unlabeled'], np.arange(50000))
    self.assertEmpty(np.intersect1d(indices['labeled'],
                                    indices['validation']))
    # With file positions (TFDS ids), "first" means first in file order.
    positions = np.random.default_rng(7).permutation(50000)
    indices = splits.cifar10_4k(labels, seed=0, variant='released_code',
                                positions=positions)
    self.assertAllEqual(np.sort(positions[indices['labeled']]),
                        np.arange(4000))
    with self.assertRaisesRegex(ValueError, 'cifar10_4k rule only'):
      splits.make('svhn_1k', labels, 0, variant='released_code')

  def test_tfds_ids_give_file_positions(self):
    self.assertAllEqual(
        tfds_source._positions(
            [b'train_00002', b'train_00000', b'train_00001']),
        [2, 0, 1])
    self.assertIsNone(tfds_source._positions([b'train_00002', b'xyz']))
    self.assertIsNone(tfds_source._positions([b'train_00005', b'train_00000']))

  def test_svhn_1k(self):
    labels = np.random.default_rng(0).permutation(
        np.repeat(np.arange(10), _SVHN_TRAIN_CLASS_SIZES))
    self.assertLen(labels, 73257)
    indices = splits.svhn_1k(labels, seed=3)
    self.assertEqual({k: len(v) for k, v in indices.items()},
                     {'labeled': 1000, 'validation': 5000,
                      'unlabeled': 67257, 'test': 0})
    self.assertAllEqual(np.bincount(labels[indices['labeled']]), [100] * 10)
    self.assertAllEqual(np.bincount(labels[indices['validation']]),
                        [500] * 10)
    self._assert_disjoint_and_cover(indices, 73257)

  def test_imagenet_10pct(self):
    class_sizes = np.random.default_rng(0).integers(732, 1301, size=1000)
    labels = np.repeat(np.arange(1000), class_sizes)
    indices = splits.imagenet_10pct(labels, seed=0)
    labeled_per_class = np.bincount(labels[indices['labeled']],
                                    minlength=1000)
    self.assertAllEqual(labeled_per_class,
                        np.floor(class_sizes * 0.1 + 0.5).astype(int))
    self.assertAllEqual(np.bincount(labels[indices['validation']]),
                        [25] * 1000)
    # Unlabeled: all of train but validation, labeled images included.
    self.assertLen(indices['unlabeled'], len(labels) - 25000)
    in_unlabeled = np.zeros(len(labels), bool)
    in_unlabeled[indices['unlabeled']] = True
    self.assertTrue(in_unlabeled[indices['labeled']].all())
    self._assert_disjoint_and_cover(indices, len(labels),
                                    unlabeled_includes_labeled=True)
    excluded = splits.imagenet_10pct(labels, seed=0,
                                     unlabeled_includes_labeled=False)
    self.assertLen(excluded['unlabeled'],
                   len(labels) - 25000 - labeled_per_class.sum())
    self.assertAllEqual(excluded['labeled'], indices['labeled'])

  def test_custom_sizes(self):
    labels = _balanced_labels(4, 30)
    by_fraction = splits.custom(labels, 0, labeled_fraction=0.25,
                                num_validation=10, num_test=20)
    self.assertEqual({k: len(v) for k, v in by_fraction.items()},
                     {'labeled': 32, 'validation': 10, 'test': 20,
                      'unlabeled': 58})
    self._assert_disjoint_and_cover(by_fraction, 120)
    per_class = splits.custom(labels, 0, labeled_per_class=2,
                              validation_per_class=3)
    self.assertAllEqual(np.bincount(labels[per_class['labeled']]), [2] * 4)
    self.assertAllEqual(np.bincount(labels[per_class['validation']]), [3] * 4)

  def test_clear_errors(self):
    labels = _balanced_labels(3, 10)
    cases = [
        (dict(labeled_per_class=9, validation_per_class=2),
         'need 11 images of class 0, but it has only 10'),
        (dict(labeled_fraction=0.01), 'gives class 0.*no labeled example'),
        (dict(labeled_per_class=0), 'must be >= 1'),
        (dict(labeled_per_class=1, num_validation=20, num_test=10),
         'leaves no training images'),
        (dict(labeled_per_class=10), 'No unlabeled images are left'),
        (dict(), 'exactly one of labeled_per_class'),
    ]
    for overrides, message in cases:
      with self.subTest(message):
        with self.assertRaisesRegex(ValueError, message):
          splits.custom(labels, 0, **overrides)
    with self.assertRaisesRegex(ValueError, r'Classes \[1\] have no'):
      splits.custom(np.array([0, 0, 2, 2]), 0, labeled_per_class=1)
    with self.assertRaisesRegex(ValueError, 'not both'):
      splits.rule_params('custom', labeled_per_class=1, labeled_fraction=0.5)


class TfdsSourceTest(tf.test.TestCase):

  def test_cifar10_end_to_end_through_the_cli(self):
    out_dir = os.path.join(self.get_temp_dir(), 'cifar10_4k')
    flags = ['--source=tfds', '--tfds_name=cifar10',
             '--tfds_data_dir=/nonexistent', '--split_rule=cifar10_4k',
             '--labeled_per_class=2', '--validation_per_class=1',
             f'--out_dir={out_dir}', '--shard_size=40']
    with _mock_tfds(num_examples=100):
      status, stderr = _run_cli(*flags)
      self.assertEqual(status, 0, stderr)
      manifest = records.read_manifest(out_dir)
      first_indices = dict(np.load(os.path.join(out_dir,
                                                'split_indices.npz')))
      # Same seed, same splits.
      self.assertEqual(_run_cli(*flags, '--overwrite')[0], 0)
    self.assertEqual(manifest['dataset'], 'cifar10_4k')
    self.assertEqual(manifest['source'], 'tfds:cifar10')
    self.assertEqual(manifest['counts'], {'labeled': 20, 'validation': 10,
                                          'unlabeled': 70, 'test': 100})
    self.assertEqual(manifest['class_counts']['labeled'], [2] * 10)
    self.assertEqual(manifest['image_size'], 32)
    self.assertEqual(manifest['channels'], 3)
    self.assertEqual(manifest['normalization'], 'cifar10')
    self.assertAllClose(manifest['mean'],
                        np.array([0.491400, 0.482158, 0.4465309]) * 255)
    self.assertLen(manifest['class_names'], 10)
    self.assertEqual(manifest['split_rule'], 'cifar10_4k')
    self.assertEqual(manifest['split_params']['labeled_per_class'], 2)
    self.assertLen(records.split_files(out_dir, 'test'), 3)
    self.assertEqual(record_checks.check_dataset(out_dir), manifest['counts'])
    second_indices = np.load(os.path.join(out_dir, 'split_indices.npz'))
    for split, indices in first_indices.items():
      self.assertAllEqual(second_indices[split], indices)
    for split, count in manifest['counts'].items():
      labels = [int(label) for _, label in _parsed(out_dir, split, 32)]
      self.assertLen(labels, count)
      self.assertAllEqual(np.bincount(labels, minlength=10),
                          manifest['class_counts'][split])

  def test_svhn_with_the_custom_rule_computes_mean_and_std(self):
    out_dir = os.path.join(self.get_temp_dir(), 'svhn')
    with _mock_tfds(num_examples=60):
      status, stderr = _run_cli(
          '--source=tfds', '--tfds_name=svhn_cropped',
          '--tfds_data_dir=/nonexistent', '--split_rule=custom',
          '--labeled_per_class=1', '--num_validation=10',
          f'--out_dir={out_dir}', '--dataset=svhn_tiny')
    self.assertEqual(status, 0, stderr)
    manifest = records.read_manifest(out_dir)
    self.assertEqual(manifest['dataset'], 'svhn_tiny')
    self.assertEqual(manifest['normalization'], 'computed')
    self.assertEqual(manifest['counts'], {'labeled': 10, 'validation': 10,
                                          'unlabeled': 40, 'test': 60})
    images = np.stack([image.numpy() for split in ('labeled', 'unlabeled')
                       for image, _ in _parsed(out_dir, split, 32)])
    self.assertAllClose(manifest['mean'], images.reshape(-1, 3).mean(0))
    self.assertAllClose(manifest['std'], images.reshape(-1, 3).std(0))

  def test_unprepared_tfds_fails_at_once_without_downloading(self):
    data_dir = self.get_temp_dir()
    with mock.patch.object(tfds.core.DatasetBuilder, 'download_and_prepare',
                           side_effect=AssertionError('downloaded')):
      with self.assertRaisesRegex(FileNotFoundError,
                                  'not prepared.*never downloads.*tfds build '
                                  'cifar10'):
        prepare.prepare(prepare.PrepareConfig(
            source='tfds', tfds_name='cifar10', tfds_data_dir=data_dir,
            out_dir=os.path.join(data_dir, 'out')))
      status, stderr = _run_cli('--source=tfds', '--tfds_name=imagenet2012',
                                f'--tfds_data_dir={data_dir}',
                                '--split_rule=imagenet_10pct',
                                f'--out_dir={data_dir}/out')
    self.assertEqual(status, 2)
    self.assertIn('ILSVRC2012_img_train.tar', stderr)
    self.assertFalse(os.path.exists(os.path.join(data_dir, 'out')))


def _write_image_folder(root, sizes_by_class, file_format='png', gray=None):
  """root/<class>/<i>.<format> files; returns {path: bytes}."""
  written = {}
  for class_index, sizes in enumerate(sizes_by_class):
    class_dir = os.path.join(root, f'class_{class_index}')
    os.makedirs(class_dir, exist_ok=True)
    for i, (height, width) in enumerate(sizes):
      image = _random_images(1, height, width, seed=class_index * 100 + i)[0]
      encoded = _jpeg(image) if file_format == 'jpg' else _png(image)
      if gray == (class_index, i):
        encoded = _png(image[..., :1])
      path = os.path.join(class_dir, f'{i}.{file_format}')
      with open(path, 'wb') as f:
        f.write(encoded)
      written[path] = encoded
  return written


class FolderAndNpzSourceTest(tf.test.TestCase):

  def test_folder_passes_jpeg_through_and_converts_gray(self):
    root = self.get_temp_dir()
    sizes = [[(8, 8), (10, 6), (8, 8), (7, 9)]] * 3
    train_files = _write_image_folder(os.path.join(root, 'train'), sizes,
                                      'jpg')
    _write_image_folder(os.path.join(root, 'test'), [[(8, 8)]] * 3, 'png',
                        gray=(1, 0))
    out_dir = os.path.join(root, 'prepared')
    manifest = prepare.prepare(prepare.PrepareConfig(
        source='folder', train_dir=os.path.join(root, 'train'),
        test_dir=os.path.join(root, 'test'), split_rule='custom',
        labeled_per_class=1, validation_per_class=1, out_dir=out_dir))
    self.assertEqual(manifest['counts'], {'labeled': 3, 'validation': 3,
                                          'unlabeled': 6, 'test': 3})
    self.assertEqual(manifest['class_names'],
                     ['class_0', 'class_1', 'class_2'])
    self.assertIsNone(manifest['image_size'])  # Mixed sizes.
    self.assertEqual(manifest['dataset'], 'prepared')
    stored = set()
    for split in ('labeled', 'unlabeled', 'validation'):
      for raw in _raw_records(out_dir, split):
        example = tf.train.Example.FromString(raw)
        stored.add(example.features.feature[records.IMAGE_KEY]
                   .bytes_list.value[0])
    self.assertEqual(stored, set(train_files.values()))
    # The gray test PNG is stored as RGB, so every record has 3 channels.
    record_checks.check_dataset(out_dir)
    self.assertEqual(manifest['normalization'], 'computed')

  def test_bad_image_file_is_named_and_nothing_is_written(self):
    root = self.get_temp_dir()
    files = _write_image_folder(os.path.join(root, 'train'),
                                [[(8, 8)] * 3] * 2)
    broken = sorted(files)[4]
    with open(broken, 'wb') as f:
      f.write(b'\x89PNG\r\n\x1a\n broken')
    out_dir = os.path.join(root, 'prepared')
    with self.assertRaisesRegex(ValueError, f'Cannot use image file {broken}'):
      prepare.prepare(prepare.PrepareConfig(
          source='folder', train_dir=os.path.join(root, 'train'),
          split_rule='custom', labeled_per_class=1, validation_per_class=1,
          num_test=1, out_dir=out_dir))
    self.assertEqual(sorted(os.listdir(root)), ['train'])

  def _assert_folder_refused(self, sizes, error, pattern, **fields):
    """prepare on a folder of `sizes` images fails; nothing is written."""
    root = self.get_temp_dir()
    _write_image_folder(os.path.join(root, 'train'), sizes)
    with self.assertRaisesRegex(error, pattern):
      prepare.prepare(prepare.PrepareConfig(
          source='folder', train_dir=os.path.join(root, 'train'),
          split_rule='custom', labeled_per_class=1,
          out_dir=os.path.join(root, 'prepared'), **fields))
    self.assertEqual(sorted(os.listdir(root)), ['train'])

  def test_folder_with_one_class_is_refused_and_nothing_is_written(self):
    self._assert_folder_refused([[(8, 8)] * 4], ValueError,
                                r'1 class \(class_0\).*at least 2 classes',
                                num_test=1)

  def test_custom_split_without_validation_is_refused(self):
    self._assert_folder_refused(
        [[(8, 8)] * 4] * 2, prepare.PrepareError,
        'no validation images.*--validation_per_class=N', num_test=2)

  def test_npz_source(self):
    root = self.get_temp_dir()
    images, test_images = _random_images(60, 8, 8), _random_images(9, 8, 8)
    labels = np.arange(60) % 3
    path = os.path.join(root, 'arrays.npz')
    np.savez(path, images=images, labels=labels, test_images=test_images,
             test_labels=np.arange(9) % 3)
    out_dir = os.path.join(root, 'prepared')
    status, stderr = _run_cli('--source=npz', f'--npz_path={path}',
                              '--split_rule=custom', '--labeled_per_class=4',
                              '--validation_per_class=2',
                              f'--out_dir={out_dir}', '--seed=5')
    self.assertEqual(status, 0, stderr)
    manifest = records.read_manifest(out_dir)
    self.assertEqual(manifest['counts'], {'labeled': 12, 'validation': 6,
                                          'unlabeled': 42, 'test': 9})
    self.assertEqual(manifest['image_size'], 8)
    self.assertEqual(manifest['seed'], 5)
    indices = np.load(os.path.join(out_dir, 'split_indices.npz'))
    train = images[np.concatenate([indices['labeled'],
                                   indices['unlabeled']])]
    self.assertAllClose(manifest['mean'], train.reshape(-1, 3).mean(0))
    labeled = np.stack([image.numpy()
                        for image, _ in _parsed(out_dir, 'labeled', 8)])
    self.assertAllEqual(labeled, images[indices['labeled']])

  def test_npz_without_test_split_needs_num_test(self):
    path = os.path.join(self.get_temp_dir(), 'arrays.npz')
    np.savez(path, x_train=_random_images(30, 4, 4),
             y_train=np.arange(30) % 2)
    out_dir = os.path.join(self.get_temp_dir(), 'out')
    common = ['--source=npz', f'--npz_path={path}', '--split_rule=custom',
              '--labeled_per_class=2', '--validation_per_class=1',
              f'--out_dir={out_dir}']
    status, stderr = _run_cli(*common)
    self.assertEqual(status, 2)
    self.assertIn('no test split', stderr)
    self.assertEqual(_run_cli(*common, '--num_test=6')[0], 0)
    self.assertEqual(records.read_manifest(out_dir)['counts']['test'], 6)


class CliTest(tf.test.TestCase):

  def test_bad_flags_exit_2_with_one_message(self):
    out_dir = os.path.join(self.get_temp_dir(), 'out')
    cases = [
        (['--source=tfds', '--no_such_flag=1'], 'Unknown command line flag'),
        (['--source=hdf5'], 'value should be one of'),
        ([f'--out_dir={out_dir}'], 'Pass --source'),
        (['--source=tfds', f'--out_dir={out_dir}'], 'needs --tfds_name'),
        (['--source=npz', '--npz_path=x.npz', f'--out_dir={out_dir}',
          '--split_rule=custom'], 'needs --labeled_per_class'),
        (['--source=npz', '--npz_path=x.npz', f'--out_dir={out_dir}',
          '--variant=released_code', '--split_rule=svhn_1k'],
         'cifar10_4k only'),
        (['--source=npz', '--npz_path=x.npz', f'--out_dir={out_dir}',
          '--labeled_per_class=1', '--labeled_fraction=0.1'], 'not both'),
        (['--source=npz', '--npz_path=/missing.npz', f'--out_dir={out_dir}'],
         'No .npz file'),
    ]
    for flags, message in cases:
      with self.subTest(message):
        status, stderr = _run_cli(*flags)
        self.assertEqual(status, 2)
        self.assertIn(message, stderr)
        self.assertNotIn('Traceback', stderr)

  def test_existing_out_dir_needs_overwrite_and_must_be_a_data_set(self):
    out_dir = self.get_temp_dir()
    with open(os.path.join(out_dir, 'notes.txt'), 'w') as f:
      f.write('mine')
    config = prepare.PrepareConfig(source='npz', npz_path='x.npz',
                                   out_dir=out_dir)
    with self.assertRaisesRegex(prepare.PrepareError, 'pass --overwrite'):
      prepare.prepare(config)
    with self.assertRaisesRegex(prepare.PrepareError, 'refusing'):
      prepare.prepare(prepare.PrepareConfig(
          source='npz', npz_path='x.npz', out_dir=out_dir, overwrite=True))

  def test_module_entry_point(self):
    result = subprocess.run(
        [sys.executable, 'prepare.py', '--source=npz',
         '--npz_path=/missing.npz', f'--out_dir={self.get_temp_dir()}/x'],
        cwd=_REPO, capture_output=True, text=True, timeout=120, check=False)
    self.assertEqual(result.returncode, 2, result.stderr)
    self.assertIn('error: No .npz file', result.stderr)
    self.assertNotIn('Traceback', result.stderr)


if __name__ == '__main__':
  tf.test.main()
