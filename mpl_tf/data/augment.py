"""Image augmentations of the training views, as batched TensorFlow ops.

All functions take float32 images [N, H, W, 3] on the 0..255 scale and return
the same shape and scale, so they run eagerly or inside `tf.data` `map` after
batching (one vectorised call per batch instead of one per image). The
randomness is unseeded: augmentations differ on every call, and only the order
of the data (see `pipeline.py`) is seeded.

The views follow the released Meta Pseudo Labels code: the labeled and the
'ori' unlabeled view are flipped, padded and cropped; the 'aug' view applies
RandAugment, Cutout and flip/pad/crop again on top of the 'ori' view.
"""

import functools

import tensorflow as tf

from mpl_tf import config as config_lib

FILL_VALUE = 128.0
MAX_PIXEL = 255.0
# The released code's RandAugment magnitude is in levels out of 10.
_RELEASED_MAX_LEVEL = 10.0


def _random_flip(images: tf.Tensor) -> tf.Tensor:
  """Mirrors each image left-right with probability 1/2."""
  flip = tf.random.uniform([tf.shape(images)[0]]) < 0.5
  return tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]),
                  images)


def _random_crop(padded: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """A random height x width window of each padded image."""
  batch = tf.shape(padded)[0]
  max_top = tf.shape(padded)[1] - height
  max_left = tf.shape(padded)[2] - width
  top = tf.random.uniform([batch], 0, max_top + 1, dtype=tf.int32)
  left = tf.random.uniform([batch], 0, max_left + 1, dtype=tf.int32)
  rows = top[:, None] + tf.range(height)[None, :]
  columns = left[:, None] + tf.range(width)[None, :]
  cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
  return tf.gather(cropped, columns, axis=2, batch_dims=1)


def flip_pad_crop(images: tf.Tensor, pad: int = None,
                  fill: float = FILL_VALUE, flip: bool = True) -> tf.Tensor:
  """Random flip (if `flip`), constant padding by `pad`, random crop back.

  Args:
    images: float32 [N, H, W, C], 0..255.
    pad: pixels added on every side; defaults to H // 8 (4 for 32x32).
    fill: value of the padding.
    flip: whether to mirror half of the images left-right (off for digits).
  """
  height, width = images.shape[1], images.shape[2]
  pad = height // 8 if pad is None else pad
  if flip:
    images = _random_flip(images)
  if pad <= 0:
    return images
  padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]],
                  constant_values=fill)
  return tf.ensure_shape(_random_crop(padded, height, width), images.shape)


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


def cutout(images: tf.Tensor, size: int = 16,
           fill: float = FILL_VALUE) -> tf.Tensor:
  """Fills one size x size square per image with `fill` (0 size: no-op).

  The square's centre is uniform over the image, and the square is clipped
  where it crosses the border, as in the released code.
  """
  if size <= 0:
    return images
  batch = tf.shape(images)[0]
  center_rows = tf.random.uniform([batch], 0, tf.shape(images)[1], tf.int32)
  center_columns = tf.random.uniform([batch], 0, tf.shape(images)[2],
                                     tf.int32)
  return _cutout_at(images, center_rows, center_columns, size, fill)


def keras_cv_magnitude(magnitude: float) -> float:
  """Maps the released code's level M (out of 10) to keras-cv's [0, 1]."""
  if magnitude < 0:
    raise ValueError(f'randaugment_magnitude={magnitude} must be >= 0.')
  return min(1.0, magnitude / _RELEASED_MAX_LEVEL)


@functools.lru_cache(maxsize=None)
def _rand_augment_layer(layers: int, magnitude: float):
  """One keras-cv RandAugment layer per (layers, magnitude), built once.

  `init_scope` lifts the layer's state out of any graph being traced, so the
  first call may come from inside a `tf.data` `map` function.
  """
  import keras_cv  # pylint: disable=g-import-not-at-top  (slow to import)
  with tf.init_scope():
    return keras_cv.layers.RandAugment(
        value_range=(0, MAX_PIXEL), augmentations_per_image=layers,
        magnitude=keras_cv_magnitude(magnitude))


def rand_augment(images: tf.Tensor, layers: int,
                 magnitude: float) -> tf.Tensor:
  """RandAugment with `layers` ops per image at the released code's level M.

  This uses keras-cv's RandAugment with magnitude min(1, M / 10): the released
  code's M is in levels out of 10, so M >= 10 is keras-cv's strongest setting.
  keras-cv's op list and magnitude ranges are not the paper's; a later issue
  replaces this with the op list and per-op magnitudes of the paper's Table 5.
  """
  if layers <= 0:
    return images
  augmented = _rand_augment_layer(int(layers), float(magnitude))(images)
  augmented = tf.clip_by_value(tf.cast(augmented, tf.float32), 0.0, MAX_PIXEL)
  return tf.ensure_shape(augmented, images.shape)


def strong_view(images: tf.Tensor,
                data_config: config_lib.DataConfig) -> tf.Tensor:
  """The 'aug' view: RandAugment, Cutout, then flip/pad/crop.

  The released code applies this to the already flipped and cropped 'ori'
  view, so pass that view in.
  """
  images = rand_augment(images, data_config.randaugment_layers,
                        data_config.randaugment_magnitude)
  images = cutout(images, data_config.cutout_size)
  return flip_pad_crop(images, pad=data_config.image_size // 8,
                       flip=data_config.horizontal_flip)


def normalize(images: tf.Tensor, mean, std) -> tf.Tensor:
  """(images - mean) / std with per-channel constants on the 0..255 scale."""
  if min(list(std)) <= 0:
    raise ValueError(f'Normalisation std {list(std)} must be positive in '
                     f'every channel.')
  mean = tf.constant(mean, dtype=tf.float32)
  std = tf.constant(std, dtype=tf.float32)
  return (tf.cast(images, tf.float32) - mean) / std
