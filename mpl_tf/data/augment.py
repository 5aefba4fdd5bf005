"""The training and evaluation views of the released code, as seeded TF ops.

Two families of data, chosen by `DataConfig.crop`:

* 'pad_crop' (CIFAR-10, SVHN, the offline digits; fixed-size images): every
  function takes a whole batch, float32 [N, H, W, 3] on the 0..255 scale, and
  returns the same shape and scale, so augmentation runs once per batch
  (vectorised) inside `tf.data`. The labeled and the 'ori' unlabeled view are
  flipped, padded by H/8 with gray 128 and cropped back; the 'aug' view applies
  RandAugment, Cutout and another flip/pad/crop on top of the 'ori' view.
* 'inception' (ImageNet; images of any size): each image gets an
  Inception-style random crop with a bicubic resize (`inception_crop`), one
  crop shared by both unlabeled views, then per-batch flips; the 'aug' view
  adds RandAugment (and no extra Cutout). Evaluation takes a centre crop.

Randomness is stateless: every function takes a `seed` (an int32/int64
tensor of shape [2]) and is a pure function of its inputs and that seed, so a
pipeline seeded from the run's seed and the batch index gives the same images
on every run, whatever the number of tf.data threads (and resumes exactly).
"""

from typing import Tuple

import tensorflow as tf

from mpl_tf import config as config_lib
from mpl_tf.data import randaugment

FILL_VALUE = 128.0
MAX_PIXEL = 255.0
# The released code's Inception crop (ImageNet training).
_CROP_MIN_OBJECT_COVERED = 0.1
_CROP_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
_CROP_AREA_RANGE = (0.08, 1.0)
_CROP_MAX_ATTEMPTS = 10


def split_seed(seed: tf.Tensor, count: int) -> tf.Tensor:
  """`count` independent [2] seeds from one [2] seed, as a [count, 2] tensor."""
  return tf.random.experimental.stateless_split(
      tf.cast(seed, tf.int64), num=count)


def fold_seed(seed: tf.Tensor, data) -> tf.Tensor:
  """A new [2] seed from `seed` and an integer (e.g. a batch index)."""
  return tf.random.experimental.stateless_fold_in(
      tf.cast(seed, tf.int64), tf.cast(data, tf.int64))


def random_flip(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirrors each image of a batch left-right with probability 1/2."""
  flip = tf.random.stateless_uniform([tf.shape(images)[0]], seed) < 0.5
  return tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]),
                  images)


def _random_crop(padded: tf.Tensor, height: int, width: int,
                 seed: tf.Tensor) -> tf.Tensor:
  """A random height x width window of each padded image."""
  batch = tf.shape(padded)[0]
  top_seed, left_seed = tf.unstack(split_seed(seed, 2))
  top = tf.random.stateless_uniform(
      [batch], top_seed, 0, tf.shape(padded)[1] - height + 1, tf.int32)
  left = tf.random.stateless_uniform(
      [batch], left_seed, 0, tf.shape(padded)[2] - width + 1, tf.int32)
  rows = top[:, None] + tf.range(height)[None, :]
  columns = left[:, None] + tf.range(width)[None, :]
  cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
  return tf.gather(cropped, columns, axis=2, batch_dims=1)


def flip_pad_crop(images: tf.Tensor, seed: tf.Tensor, pad: int = None,
                  fill: float = FILL_VALUE, flip: bool = True) -> tf.Tensor:
  """Random flip (if `flip`), constant padding by `pad`, random crop back.

  Args:
    images: float32 [N, H, W, C], 0..255, static H and W.
    seed: [2] seed.
    pad: pixels added on every side; defaults to H // 8 (4 for 32x32), the
      released code's value.
    fill: value of the padding (the released code: gray 128).
    flip: whether to mirror half of the images left-right (off for digits).
  """
  height, width = images.shape[1], images.shape[2]
  pad = height // 8 if pad is None else pad
  flip_seed, crop_seed = tf.unstack(split_seed(seed, 2))
  if flip:
    images = random_flip(images, flip_seed)
  if pad <= 0:
    return images
  padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]],
                  constant_values=fill)
  return tf.ensure_shape(_random_crop(padded, height, width, crop_seed),
                         images.shape)


def _cutout_at(images: tf.Tensor, center_rows: tf.Tensor,
               center_columns: tf.Tensor, size: int,
               fill: float) -> tf.Tensor:
  """Fills a size x size square at each given centre, clipped at borders."""
  height, width = tf.shape(images)[1], tf.shape(images)[2]
  half = size // 2
  top = tf.maximum(center_rows - half, 0)
  bottom = tf.minimum(center_rows - half + size, height)
  left = tf.maximum(center_columns - half, 0)
  right = tf.minimum(center_columns - half + size, width)
  rows = tf.range(height)[None, :]
  columns = tf.range(width)[None, :]
  in_rows = (rows >= top[:, None]) & (rows < bottom[:, None])
  in_columns = (columns >= left[:, None]) & (columns < right[:, None])
  square = in_rows[:, :, None, None] & in_columns[:, None, :, None]
  return tf.where(square, tf.cast(fill, images.dtype), images)


def cutout(images: tf.Tensor, seed: tf.Tensor, size: int = 16,
           fill: float = FILL_VALUE) -> tf.Tensor:
  """Fills one size x size square per image with `fill` (size 0: no-op).

  The square's centre is uniform over the image, and the square is clipped
  where it crosses the border, as in the released code.
  """
  if size <= 0:
    return images
  batch = tf.shape(images)[0]
  row_seed, column_seed = tf.unstack(split_seed(seed, 2))
  center_rows = tf.random.stateless_uniform(
      [batch], row_seed, 0, tf.shape(images)[1], tf.int32)
  center_columns = tf.random.stateless_uniform(
      [batch], column_seed, 0, tf.shape(images)[2], tf.int32)
  return _cutout_at(images, center_rows, center_columns, size, fill)


def rand_augment(images: tf.Tensor, data_config: config_lib.DataConfig,
                 seed: tf.Tensor) -> tf.Tensor:
  """RandAugment with the data config's op list, N, M and constants."""
  if data_config.randaugment_layers <= 0:
    return images
  return randaugment.rand_augment(
      images, op_list=data_config.randaugment_ops,
      num_layers=data_config.randaugment_layers,
      magnitude=data_config.randaugment_magnitude,
      translate_const=data_config.randaugment_translate_const,
      cutout_const=data_config.randaugment_cutout_const, seed=seed)


def strong_view(images: tf.Tensor, data_config: config_lib.DataConfig,
                seed: tf.Tensor) -> tf.Tensor:
  """The 'aug' view of 'pad_crop' data: RandAugment, Cutout, flip/pad/crop.

  The released code applies this to the already flipped and cropped 'ori'
  view, so pass that view in.
  """
  augment_seed, cutout_seed, crop_seed = tf.unstack(split_seed(seed, 3))
  images = rand_augment(images, data_config, augment_seed)
  images = cutout(images, cutout_seed, data_config.cutout_size)
  return flip_pad_crop(images, crop_seed, pad=data_config.image_size // 8,
                       flip=data_config.horizontal_flip)


def _resize_bicubic(image: tf.Tensor, size: int, channels: int) -> tf.Tensor:
  resized = tf.image.resize(tf.cast(image, tf.float32), [size, size],
                            method='bicubic')
  resized = tf.clip_by_value(resized, 0.0, MAX_PIXEL)
  return tf.ensure_shape(resized, [size, size, channels])


def _central_window(image_shape: tf.Tensor, fraction: float
                    ) -> Tuple[tf.Tensor, tf.Tensor]:
  """(offset [2], size [2]) of the centred square of `fraction` * short side."""
  height, width = image_shape[0], image_shape[1]
  side = tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32),
                 tf.int32)
  side = tf.maximum(side, 1)
  offset = tf.stack([(height - side + 1) // 2, (width - side + 1) // 2])
  return offset, tf.stack([side, side])


def center_crop(image: tf.Tensor, size: int, fraction: float) -> tf.Tensor:
  """Evaluation view of 'inception' data: the centred square covering
  `fraction` of the short side (224/256 as released), resized bicubically.

  One image uint8/float [H, W, 3] -> float32 [size, size, 3], 0..255.
  """
  offset, window = _central_window(tf.shape(image), fraction)
  cropped = tf.slice(image, tf.concat([offset, [0]], 0),
                     tf.concat([window, [-1]], 0))
  return _resize_bicubic(cropped, size, image.shape[-1])


def inception_crop(image: tf.Tensor, size: int, seed: tf.Tensor,
                   fallback_fraction: float = 0.875) -> tf.Tensor:
  """The released code's Inception-style random crop of one image.

  A box covering >= 10% of the object (the whole image), with aspect ratio in
  [3/4, 4/3] and area in [8%, 100%], 10 attempts; when no attempt succeeds
  (the sampler returns the whole image) it falls back to the centre crop.
  Then a bicubic resize to size x size. Flips are applied later, per batch.

  One image [H, W, 3] of any size -> float32 [size, size, 3], 0..255.
  """
  shape = tf.shape(image)
  whole_image = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])
  begin, window, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, whole_image, seed=tf.cast(seed, tf.int64),
      min_object_covered=_CROP_MIN_OBJECT_COVERED,
      aspect_ratio_range=_CROP_ASPECT_RATIO_RANGE,
      area_range=_CROP_AREA_RANGE, max_attempts=_CROP_MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True)
  failed = tf.reduce_all(tf.equal(window[:2], shape[:2]))

  def sampled():
    return _resize_bicubic(tf.slice(image, begin, window), size,
                           image.shape[-1])

  return tf.cond(failed, lambda: center_crop(image, size, fallback_fraction),
                 sampled)


def normalize(images: tf.Tensor, mean, std) -> tf.Tensor:
  """(images - mean) / std with per-channel constants on the 0..255 scale."""
  if min(list(std)) <= 0:
    raise ValueError(f'Normalisation std {list(std)} must be positive in '
                     f'every channel.')
  mean = tf.constant(mean, dtype=tf.float32)
  std = tf.constant(std, dtype=tf.float32)
  return (tf.cast(images, tf.float32) - mean) / std
