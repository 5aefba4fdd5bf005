"""Tests of the training and evaluation views and the tf.data pipelines.

The offline 'digits' set is prepared once into a temporary directory with a
small configuration; a second, tiny set of images of different sizes stands
in for ImageNet (the 'inception' views).
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
_SEED = tf.constant([7, 11], tf.int64)


def _first_batches(dataset, count=2):
  return [{k: v.numpy() for k, v in batch.items()}
          for batch in dataset.take(count)]


def _write_variable_size_set(data_dir, sizes, num_classes=3):
  """A tiny 'ImageNet': images of different sizes in every split."""
  rng = np.random.default_rng(0)
  counts = {}
  for split in records.SPLITS:
    path = os.path.join(data_dir, records.shard_name(split, 0, 1))
    with tf.io.TFRecordWriter(path) as writer:
      for index, (height, width) in enumerate(sizes):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        writer.write(records.serialize_example(image, index % num_classes))
    counts[split] = len(sizes)
  manifest = {'dataset': 'tiny_imagenet', 'source': 'tiny_imagenet',
              'num_classes': num_classes, 'image_size': None, 'channels': 3,
              'counts': counts, 'mean': [120.0] * 3, 'std': [60.0] * 3}
  records.write_manifest(data_dir, manifest)
  return manifest


class DigitsPipelineTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.temporary = tempfile.TemporaryDirectory()
    cls.data_config = config_lib.DataConfig(
        data_dir=os.path.join(cls.temporary.name, 'digits'),
        randaugment_magnitude=16.0, **_SMALL_DIGITS)
    cls.manifest = offline.ensure_prepared(cls.data_config)

  @classmethod
  def tearDownClass(cls):
    cls.temporary.cleanup()
    super().tearDownClass()

  def _config(self, data=None, **optim):
    return config_lib.Config(data=data or self.data_config,
                             optim=config_lib.OptimConfig(**optim))

  def test_train_batch_keys_dtypes_and_static_shapes(self):
    config = self._config(labeled_batch_size=4, uda_ratio=3)
    dataset = pipeline.train_dataset(config, self.manifest)
    expected = {'labeled_images': ([4, 32, 32, 3], tf.float32),
                'labels': ([4], tf.int32),
                'unlabeled_images_ori': ([12, 32, 32, 3], tf.float32),
                'unlabeled_images_aug': ([12, 32, 32, 3], tf.float32),
                'unlabeled_labels': ([12], tf.int32)}
    self.assertEqual(set(dataset.element_spec), set(expected))
    for key, (shape, dtype) in expected.items():
      self.assertEqual(dataset.element_spec[key].shape, shape)
      self.assertEqual(dataset.element_spec[key].dtype, dtype)
    batch = next(iter(dataset))
    mean, std = np.array(self.manifest['mean']), np.array(self.manifest['std'])
    for key in ('labeled_images', 'unlabeled_images_ori',
                'unlabeled_images_aug'):
      raw = batch[key].numpy() * std + mean
      self.assertBetween(raw.min(), -1e-3, 255.001)
      self.assertBetween(raw.max(), -1e-3, 255.001)
    # The augmented view is not the original one.
    self.assertNotAllClose(batch['unlabeled_images_ori'],
                           batch['unlabeled_images_aug'])

  def test_training_stream_is_deterministic_under_a_seed(self):
    config = self._config(labeled_batch_size=4, uda_ratio=2)
    first = _first_batches(pipeline.train_dataset(config, self.manifest))
    again = _first_batches(pipeline.train_dataset(config, self.manifest))
    for batch, repeated in zip(first, again):
      for key in batch:
        self.assertAllEqual(batch[key], repeated[key])
    other_seed = self._config(
        data=dataclasses.replace(self.data_config, shuffle_seed=5),
        labeled_batch_size=4, uda_ratio=2)
    other = _first_batches(pipeline.train_dataset(other_seed, self.manifest))
    self.assertNotAllClose(first[0]['unlabeled_images_aug'],
                           other[0]['unlabeled_images_aug'])
    # Consecutive batches draw fresh augmentations.
    self.assertNotAllClose(first[0]['unlabeled_images_aug'],
                           first[1]['unlabeled_images_aug'])

  def test_per_replica_batches_under_an_input_context(self):
    context = tf.distribute.InputContext(
        num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=2)
    config = self._config(labeled_batch_size=4, uda_ratio=3)
    dataset = pipeline.train_dataset(config, self.manifest, context)
    self.assertEqual(dataset.element_spec['labeled_images'].shape[0], 2)
    self.assertEqual(dataset.element_spec['unlabeled_images_aug'].shape[0], 6)

  def test_labeled_dataset(self):
    dataset = pipeline.labeled_dataset(self._config(), self.manifest, 8)
    batch = next(iter(dataset))
    self.assertEqual(set(batch), {'labeled_images', 'labels'})
    self.assertEqual(batch['labeled_images'].shape, [8, 32, 32, 3])

  def test_labeled_order_is_seeded(self):
    def first_labels(shuffle_seed):
      config = self._config(data=dataclasses.replace(
          self.data_config, shuffle_seed=shuffle_seed))
      dataset = pipeline.labeled_dataset(config, self.manifest, 50)
      return next(iter(dataset))['labels'].numpy()
    self.assertAllEqual(first_labels(1), first_labels(1))
    self.assertNotAllEqual(first_labels(1), first_labels(2))

  def test_eval_mask_counts_exactly_the_real_examples(self):
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
    files = records.split_files(self.data_config.data_dir, 'validation')
    labels = [int(label) for _, label in tf.data.TFRecordDataset(files).map(
        lambda s: records.parse_example(s, 32, 3))]
    evaluated = np.concatenate([b['labels'].numpy() for b in batches])
    self.assertAllEqual(evaluated[:100], labels)

  def test_eval_batches_per_replica_and_per_input_pipeline(self):
    # 2 replicas on one pipeline: per-replica batches of 32, a number of
    # batches divisible by the replicas.
    one_pipeline = tf.distribute.InputContext(1, 0, 2)
    batches = list(pipeline.eval_dataset(self._config(), self.manifest,
                                         'validation', 64, one_pipeline))
    self.assertLen(batches, 4)
    self.assertEqual(batches[0]['images'].shape, [32, 32, 32, 3])
    self.assertEqual(sum(b['mask'].numpy().sum() for b in batches), 100)
    # 2 pipelines (workers) of one replica each: every record exactly once.
    shares = [list(pipeline.eval_dataset(
        self._config(), self.manifest, 'validation', 64,
        tf.distribute.InputContext(2, worker, 2))) for worker in (0, 1)]
    self.assertEqual([len(share) for share in shares], [2, 2])
    labels = np.concatenate([b['labels'].numpy()[b['mask'].numpy() > 0]
                             for share in shares for b in share])
    self.assertLen(labels, 100)
    self.assertAllEqual(np.bincount(labels, minlength=10),
                        self.manifest['class_counts']['validation'])

  def test_wrong_image_size_names_the_fix(self):
    config = self._config(data=dataclasses.replace(self.data_config,
                                                   image_size=24))
    with self.assertRaisesRegex(ValueError, 'image_size=32'):
      pipeline.train_dataset(config, self.manifest)

  def test_label_outside_the_classes_stops_the_stream(self):
    manifest = dict(self.manifest, num_classes=3)
    dataset = pipeline.labeled_dataset(self._config(), manifest, 50)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                r"label outside \[0, 3\) in split .*labeled"):
      next(iter(dataset))


class VariableSizePipelineTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.temporary = tempfile.TemporaryDirectory()
    cls.sizes = [(40, 60), (64, 48), (50, 50), (36, 80)] * 2
    cls.manifest = _write_variable_size_set(cls.temporary.name, cls.sizes)
    cls.data_config = config_lib.DataConfig(
        dataset='tiny_imagenet', data_dir=cls.temporary.name, image_size=24,
        crop='inception', cutout_size=0, randaugment_magnitude=17.0,
        randaugment_translate_const=100.0, randaugment_cutout_const=40.0)

  @classmethod
  def tearDownClass(cls):
    cls.temporary.cleanup()
    super().tearDownClass()

  def test_inception_streams_have_static_shapes(self):
    config = config_lib.Config(data=self.data_config, optim=config_lib
                               .OptimConfig(labeled_batch_size=2, uda_ratio=2))
    batch = next(iter(pipeline.train_dataset(config, self.manifest)))
    self.assertEqual(batch['labeled_images'].shape, [2, 24, 24, 3])
    self.assertEqual(batch['unlabeled_images_ori'].shape, [4, 24, 24, 3])
    self.assertEqual(batch['unlabeled_images_aug'].shape, [4, 24, 24, 3])
    evaluation = list(pipeline.eval_dataset(config, self.manifest, 'test', 3))
    self.assertLen(evaluation, 3)
    self.assertEqual(sum(float(b['mask'].numpy().sum()) for b in evaluation),
                     len(self.sizes))

  def test_pad_crop_on_variable_sizes_names_the_fix(self):
    config = config_lib.Config(
        data=dataclasses.replace(self.data_config, crop='pad_crop'))
    with self.assertRaisesRegex(ValueError, '--crop=inception'):
      pipeline.train_dataset(config, self.manifest)


class ViewsTest(tf.test.TestCase):

  def _images(self, batch=6, size=32):
    return tf.random.stateless_uniform([batch, size, size, 3], [1, 2], 0.0,
                                       255.0)

  def _assert_image_like(self, augmented, images):
    self.assertEqual(augmented.shape, images.shape)
    self.assertEqual(augmented.dtype, tf.float32)
    self.assertGreaterEqual(float(tf.reduce_min(augmented)), 0.0)
    self.assertLessEqual(float(tf.reduce_max(augmented)), 255.0)

  def test_views_keep_shape_and_range_eagerly_and_in_tf_data(self):
    data_config = config_lib.DataConfig(randaugment_magnitude=16.0)
    views = {
        'flip_pad_crop': lambda x, s: augment.flip_pad_crop(x, s),
        'cutout': lambda x, s: augment.cutout(x, s),
        'strong_view': lambda x, s: augment.strong_view(x, data_config, s),
    }
    images = self._images()
    for name, view in views.items():
      with self.subTest(name):
        eager = view(images, _SEED)
        self._assert_image_like(eager, images)
        self.assertAllEqual(view(images, _SEED), eager)
        dataset = tf.data.Dataset.from_tensors(images).repeat(2).map(
            lambda x, v=view: v(x, _SEED), num_parallel_calls=tf.data.AUTOTUNE)
        self.assertEqual(dataset.element_spec.shape, images.shape)
        for augmented in dataset:
          self.assertAllEqual(augmented, eager)

  def test_flip_pad_crop_without_pad_or_flip_is_identity(self):
    images = self._images()
    self.assertAllEqual(
        augment.flip_pad_crop(images, _SEED, pad=0, flip=False), images)

  def test_flip_mirrors_about_half_of_the_images(self):
    ramp = tf.tile(tf.reshape(tf.range(8.0), [1, 1, 8, 1]), [400, 2, 1, 3])
    flipped = augment.random_flip(ramp, _SEED).numpy()
    mirrored = np.all(flipped == ramp.numpy()[:, :, ::-1], axis=(1, 2, 3))
    unchanged = np.all(flipped == ramp.numpy(), axis=(1, 2, 3))
    self.assertTrue(np.all(mirrored | unchanged))
    self.assertBetween(mirrored.mean(), 0.4, 0.6)

  def test_crop_is_a_shifted_window_with_fill(self):
    ramp = tf.reshape(tf.range(1.0, 65.0), [1, 8, 8, 1])
    cropped = augment.flip_pad_crop(tf.tile(ramp, [20, 1, 1, 3]), _SEED,
                                    pad=2, flip=False).numpy()
    for image in cropped[..., 0]:
      inside = image != 128.0
      rows, columns = np.nonzero(inside)
      window = image[rows.min():rows.max() + 1, columns.min():columns.max() + 1]
      self.assertTrue(np.all(window != 128.0))
      # Consecutive pixels of the ramp stay consecutive: a pure shift.
      self.assertAllEqual(np.diff(window, axis=1), np.ones_like(window[:, 1:]))

  def test_cutout_fills_a_square_of_the_right_size(self):
    images = tf.zeros([50, 32, 32, 3])
    filled = augment.cutout(images, _SEED, size=16).numpy()
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

  def test_center_crop_takes_the_middle_of_the_short_side(self):
    image = tf.reshape(tf.range(10.0 * 20.0 * 3.0) % 251.0, [10, 20, 3])
    # The whole short side, no resize needed: exactly the central 10x10.
    self.assertAllClose(augment.center_crop(image, 10, 1.0),
                        image[:, 5:15], atol=1e-3)
    self.assertEqual(augment.center_crop(image, 7, 0.875).shape, [7, 7, 3])

  def test_inception_crop_shape_range_and_seed(self):
    image = tf.cast(tf.random.stateless_uniform([50, 70, 3], [3, 4], 0, 256,
                                                tf.int32), tf.uint8)
    crops = [augment.inception_crop(image, 16, tf.constant([i, 0]))
             for i in range(5)]
    for crop in crops:
      self.assertEqual(crop.shape, [16, 16, 3])
      self.assertBetween(float(tf.reduce_min(crop)), 0.0, 255.0)
      self.assertBetween(float(tf.reduce_max(crop)), 0.0, 255.0)
    self.assertAllEqual(augment.inception_crop(image, 16, tf.constant([0, 0])),
                        crops[0])
    self.assertNotAllClose(crops[0], crops[1])

  def test_normalize(self):
    images = tf.fill([2, 4, 4, 3], 100.0)
    normalised = augment.normalize(images, [100.0, 50.0, 0.0], [1.0, 2.0, 4.0])
    self.assertAllClose(normalised[0, 0, 0], [0.0, 25.0, 25.0])


if __name__ == '__main__':
  tf.test.main()
