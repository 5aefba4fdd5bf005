"""tf.data input pipelines: the MPL training stream, the labeled-only stream
of the supervised baseline, and padded evaluation batches.

Every batch has a fully static shape, so a compiled train or eval step is
traced once. Training streams repeat forever; their order is seeded from
`DataConfig.shuffle_seed` (the labeled stream with the seed, the unlabeled
stream with seed + 1, so the two orders differ), while augmentations are
drawn freshly on every pass. Augmentation runs on whole batches, after
batching, and every image leaves normalised with the manifest's per-channel
mean and std.
"""

from typing import Any, Dict

import tensorflow as tf

from mpl_tf import config as config_lib
from mpl_tf.data import augment
from mpl_tf.data import records

AUTOTUNE = tf.data.AUTOTUNE
# Splits up to this many records are shuffled whole (the buffer holds PNG
# bytes, about 1 kB for a 32x32 digit); larger ones use 16 batches.
_WHOLE_SPLIT_SHUFFLE_LIMIT = 100_000
_SHUFFLE_BATCHES = 16


def _split_count(manifest: Dict[str, Any], split: str) -> int:
  count = manifest.get('counts', {}).get(split)
  if count is None:
    raise ValueError(f'The manifest has no count for split {split!r}; '
                     f'prepare the data set again.')
  return int(count)


def _check_image_size(config: config_lib.Config,
                      manifest: Dict[str, Any]) -> None:
  if manifest['image_size'] != config.data.image_size:
    raise ValueError(
        f'The prepared images in {config.data.data_dir!r} are '
        f'{manifest["image_size"]}x{manifest["image_size"]} but '
        f'image_size={config.data.image_size}; set image_size to match.')


def _parsed_split(config: config_lib.Config, manifest: Dict[str, Any],
                  split: str, shuffle_batch_size: int = 0,
                  seed: int = 0) -> tf.data.Dataset:
  """(uint8 image, int32 label) pairs; shuffled and repeated if asked."""
  files = records.split_files(config.data.data_dir, split)
  dataset = tf.data.TFRecordDataset(
      files, num_parallel_reads=AUTOTUNE if len(files) > 1 else None)
  if shuffle_batch_size:
    count = _split_count(manifest, split)
    if count == 0:
      raise ValueError(f'Split {split!r} in {config.data.data_dir!r} is '
                       f'empty; a training stream needs at least one image.')
    dataset = dataset.shuffle(shuffle_buffer_size(count, shuffle_batch_size),
                              seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.repeat()
  image_size, channels = manifest['image_size'], manifest['channels']
  return dataset.map(
      lambda serialized: records.parse_example(serialized, image_size,
                                               channels),
      num_parallel_calls=AUTOTUNE)


def shuffle_buffer_size(num_records: int, batch_size: int) -> int:
  """The whole split when it is small, else min(num_records, 16 batches)."""
  if num_records <= _WHOLE_SPLIT_SHUFFLE_LIMIT:
    return max(num_records, 1)
  return min(num_records, _SHUFFLE_BATCHES * batch_size)


def _batched_float_stream(config: config_lib.Config, manifest: Dict[str, Any],
                          split: str, batch_size: int,
                          seed: int) -> tf.data.Dataset:
  """Repeated, shuffled, batched (float32 0..255 images, int32 labels)."""
  dataset = _parsed_split(config, manifest, split, batch_size, seed)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  return dataset.map(lambda images, labels: (tf.cast(images, tf.float32),
                                             labels),
                     num_parallel_calls=AUTOTUNE)


def _labeled_stream(config: config_lib.Config, manifest: Dict[str, Any],
                    batch_size: int) -> tf.data.Dataset:
  data = config.data
  mean, std = manifest['mean'], manifest['std']

  def make_view(images, labels):
    images = augment.flip_pad_crop(images, pad=data.image_size // 8,
                                   flip=data.horizontal_flip)
    return {'labeled_images': augment.normalize(images, mean, std),
            'labels': labels}

  dataset = _batched_float_stream(config, manifest, 'labeled', batch_size,
                                  data.shuffle_seed)
  return dataset.map(make_view, num_parallel_calls=AUTOTUNE)


def _unlabeled_stream(config: config_lib.Config, manifest: Dict[str, Any],
                      batch_size: int) -> tf.data.Dataset:
  data = config.data
  mean, std = manifest['mean'], manifest['std']

  def make_views(images, unused_labels):
    original = augment.flip_pad_crop(images, pad=data.image_size // 8,
                                     flip=data.horizontal_flip)
    strong = augment.strong_view(original, data)
    return {'unlabeled_images_ori': augment.normalize(original, mean, std),
            'unlabeled_images_aug': augment.normalize(strong, mean, std)}

  dataset = _batched_float_stream(config, manifest, 'unlabeled', batch_size,
                                  data.shuffle_seed + 1)
  return dataset.map(make_views, num_parallel_calls=AUTOTUNE)


def train_dataset(config: config_lib.Config,
                  manifest: Dict[str, Any]) -> tf.data.Dataset:
  """The endless MPL training stream of dicts of static-shape tensors.

  Keys: `labeled_images` float32 [B, S, S, C], `labels` int32 [B],
  `unlabeled_images_ori` and `unlabeled_images_aug` float32 [B*mu, S, S, C],
  with B = config.optim.labeled_batch_size and B*mu =
  config.unlabeled_batch_size. The labels of unlabeled images are not given.
  """
  _check_image_size(config, manifest)
  labeled = _labeled_stream(config, manifest, config.optim.labeled_batch_size)
  unlabeled = _unlabeled_stream(config, manifest,
                                config.unlabeled_batch_size)
  dataset = tf.data.Dataset.zip((labeled, unlabeled))
  dataset = dataset.map(lambda first, second: {**first, **second})
  return dataset.prefetch(AUTOTUNE)


def labeled_dataset(config: config_lib.Config, manifest: Dict[str, Any],
                    batch_size: int) -> tf.data.Dataset:
  """The endless labeled stream alone (the supervised baseline's input).

  Dicts of `labeled_images` float32 [batch_size, S, S, C] (flipped, padded and
  cropped, normalised) and `labels` int32 [batch_size].
  """
  _check_image_size(config, manifest)
  return _labeled_stream(config, manifest, batch_size).prefetch(AUTOTUNE)


def _padding_examples(count: int, image_shape) -> tf.data.Dataset:
  padding = {'images': tf.zeros(image_shape, tf.uint8),
             'labels': tf.constant(0, tf.int32),
             'mask': tf.constant(0.0, tf.float32)}
  return tf.data.Dataset.from_tensors(padding).repeat(count)


def eval_dataset(config: config_lib.Config, manifest: Dict[str, Any],
                 split: str, batch_size: int) -> tf.data.Dataset:
  """One pass over a split in whole, equally shaped, padded batches.

  Dicts of `images` float32 [batch_size, S, S, C] (normalised, no
  augmentation), `labels` int32 [batch_size] and `mask` float32 [batch_size]:
  1 for a real image, 0 for padding. Padding images are all zeros (after
  normalisation) with label 0; the last batch is filled up with them, so
  `sum(mask)` over the pass is the split's size.
  """
  _check_image_size(config, manifest)
  count = _split_count(manifest, split)
  image_shape = [manifest['image_size'], manifest['image_size'],
                 manifest['channels']]
  real = _parsed_split(config, manifest, split).map(
      lambda image, label: {'images': image, 'labels': label,
                            'mask': tf.constant(1.0, tf.float32)})
  dataset = real.concatenate(_padding_examples(-count % batch_size,
                                               image_shape))
  dataset = dataset.batch(batch_size, drop_remainder=True)
  mean, std = manifest['mean'], manifest['std']

  def normalize(batch):
    images = augment.normalize(batch['images'], mean, std)
    return {**batch, 'images': images * batch['mask'][:, None, None, None]}

  return dataset.map(normalize, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
