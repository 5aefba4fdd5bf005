"""The RandAugment ops: each op's strength at level M, and its image math.

`op_arguments` maps the level M to each op's fixed strength as the released
code does, and `Ops` applies one op to a batch of images at those strengths.
What is drawn at random (which op each image gets, with what probability,
its sign, Cutout centre and SamplePairing partner) is `randaugment.py`'s
job: it hands `Ops` the draws. Keeping the ops apart lets each be read,
tested and compared with the released code on its own.

The image math of each op is the keras-cv (or Keras 3) preprocessing layer's
own batched method (`augment_images` / `transform_images`), fed with per-image
transformations that we draw ourselves. The layers' own random draws are never
used, which is what makes fixed-strength ops and reproducible seeds possible:
keras-cv layers sample factors from ranges with a stateful generator, whose
state cannot be created inside a `tf.data` map function and cannot be keyed on
a per-call seed. Only Brightness (keras-cv/Keras brightness is additive, PIL's
and the released code's is multiplicative) and SamplePairing (no layer exists)
are our own ops.

Behaviour decisions (docs/augmentation.md has the full table and reasons):

* Values: images stay float32 on 0..255. Extrapolating ops (enhance factors
  2.98 / 3.16) are cleanly clipped to [0, 255] by the keras-cv blend; we do not
  copy the released `blend`'s uint8 overflow. There is no uint8 rounding
  between ops (the released code rounds after each op).
* Contrast uses keras-cv's per-image, per-channel mean, neither PIL's grayscale
  mean nor the released code's "pixel count / 256" quirk.
* Solarize keeps the released threshold int(M/10*256), so it is a no-op for
  M >= 10 (409 at M=16), exactly like the released code.
* Posterize uses bits = clip(int(M/10*4), 1, 8): at M < 2.5 the released code
  shifts a uint8 by 8, which TF clamps to 7, i.e. 1 bit.
* SamplePairing blends with another image of the same batch with weight
  w = 0.4 * min(M/10, 1) on the partner (AutoAugment's range [0, 0.4]), capped
  so the partner never dominates and the label stays the image's own.
* Equalize is keras-cv's: it derives the histogram step from the smallest
  non-zero bin, where PIL and the released code use the last non-zero bin.
"""

import math
import numbers
from typing import Dict, Optional

import tensorflow as tf

MAX_LEVEL = 10.0  # The released code's levels are out of 10.
FILL_VALUE = 128.0  # Gray fill of geometric ops and Cutout (released code).
MAX_PIXEL = 255.0
SAMPLE_PAIRING_MAX_WEIGHT = 0.4  # AutoAugment's SamplePairing range [0, 0.4].

# Ops whose strength is zero at M = 0, so they return the input unchanged.
# The enhance ops are not here: their factor at M = 0 is 0.1, not 1. Nor are
# Solarize (threshold 0 inverts every pixel) and Posterize (1 bit).
IDENTITY_AT_ZERO_MAGNITUDE = frozenset(
    {'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout',
     'SamplePairing'})

# Ops whose argument gets a random sign per image, as in the released code.
SIGNED_OPS = frozenset(
    {'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'})

# Columns of the per-image uniform draws that ops with randomness use.
_SIGN, _CUTOUT_ROW, _CUTOUT_COLUMN, _PARTNER = range(4)
NUM_DRAWS = 4


def op_arguments(magnitude: float, translate_const: float,
                 cutout_const: float) -> Dict[str, Optional[float]]:
  """Each op's fixed strength at level `magnitude`, mapped as released.

  The formulas (and their evaluation order, which decides the int() results)
  are the released `level_to_arg`'s; signed ops return the magnitude, the sign
  is drawn per image. Values beyond the released code: Posterize is clamped to
  the 1..8 bits that TF's clamped shift actually produces, and SamplePairing
  (not in the released code) uses AutoAugment's [0, 0.4] weight range.

  Args:
    magnitude: M, levels out of 10 (16 for CIFAR-10, 17 for ImageNet).
    translate_const: pixels of TranslateX/Y at M = 10.
    cutout_const: half-side of RandAugment's Cutout square at M = 10.

  Returns:
    Op name -> argument: 'Rotate' degrees, 'Posterize' bits, 'Solarize'
    threshold, enhance factors, 'ShearX'/'ShearY' shear, 'TranslateX'/'Y'
    pixels, 'Cutout' pad (the square's side is 2 * pad), 'SamplePairing'
    partner weight; None for ops without an argument.
  """
  _check_magnitude(magnitude, translate_const, cutout_const)
  level = float(magnitude) / MAX_LEVEL
  enhance = level * 1.8 + 0.1
  translate = level * float(translate_const)
  return {
      'AutoContrast': None,
      'Equalize': None,
      'Invert': None,
      'Rotate': level * 30.0,
      'Posterize': min(8, max(1, int(level * 4))),
      'Solarize': int(level * 256),
      'Color': enhance,
      'Contrast': enhance,
      'Brightness': enhance,
      'Sharpness': enhance,
      'ShearX': level * 0.3,
      'ShearY': level * 0.3,
      'TranslateX': translate,
      'TranslateY': translate,
      'Cutout': int(level * float(cutout_const)),
      'SamplePairing': SAMPLE_PAIRING_MAX_WEIGHT * min(level, 1.0),
  }


def _check_magnitude(magnitude, translate_const, cutout_const):
  for name, value in (('magnitude', magnitude),
                      ('translate_const', translate_const),
                      ('cutout_const', cutout_const)):
    if isinstance(value, (tf.Tensor, tf.Variable)):
      raise ValueError(f'{name} must be a Python number (it fixes each op\'s '
                       f'strength when the op is built), got a tensor.')
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
      raise ValueError(f'{name}={value!r} must be a Python int or float.')
    if value < 0 or not math.isfinite(value):
      raise ValueError(f'{name}={value} must be a finite number >= 0; the '
                       f'random sign of signed ops is drawn per image, so pass '
                       f'the absolute value (M=16 for CIFAR-10, 17 ImageNet).')


class Ops:
  """The ops at fixed strengths, built from keras-cv / Keras 3 layers once.

  Layers are constructed under `tf.init_scope` so that building them from
  inside a `tf.data` map function or a `tf.function` creates their state (the
  global generator, Keras seed variables) eagerly, outside the traced graph.
  """

  def __init__(self, args: Dict[str, Optional[float]]):
    import keras  # pylint: disable=g-import-not-at-top
    import keras_cv  # pylint: disable=g-import-not-at-top  (slow to import)
    self.args = args
    value_range = (0.0, MAX_PIXEL)
    geometry = dict(fill_mode='constant', fill_value=FILL_VALUE,
                    interpolation='nearest')
    with tf.init_scope():
      layers = keras_cv.layers
      self.auto_contrast = layers.AutoContrast(value_range=value_range)
      self.equalize = layers.Equalization(value_range=value_range)
      self.invert = keras.layers.RandomInvert(factor=1.0,
                                              value_range=value_range)
      self.posterize = layers.Posterization(value_range=value_range,
                                            bits=int(args['Posterize']))
      self.solarize = layers.Solarization(value_range=value_range)
      # The factor ranges below are placeholders the constructors require;
      # the fixed strength reaches `augment_images` as the transformation.
      self.color = layers.RandomColorDegeneration(factor=0.5)
      self.contrast = layers.RandomContrast(value_range=value_range,
                                            factor=0.5)
      self.sharpness = layers.RandomSharpness(factor=0.5,
                                              value_range=value_range)
      self.rotate = layers.RandomRotation(factor=0.1, **geometry)
      self.shear = layers.RandomShear(x_factor=0.1, y_factor=0.1, **geometry)
      self.translate = layers.RandomTranslation(
          height_factor=0.1, width_factor=0.1, **geometry)
      self.cutout = layers.RandomCutout(height_factor=0.1, width_factor=0.1,
                                        fill_mode='constant',
                                        fill_value=FILL_VALUE)

  def __call__(self, name: str, images: tf.Tensor, draws: tf.Tensor,
               partners_fn) -> tf.Tensor:
    """Applies op `name` to every image of `images` ([n, H, W, 3])."""
    n = tf.shape(images)[0]
    arg = self.args[name]
    sign = tf.where(draws[:, _SIGN] < 0.5, 1.0, -1.0)

    def per_image(value):  # [n, 1, 1, 1], the layers' transformation shape.
      return tf.fill([n, 1, 1, 1], tf.constant(value, tf.float32))

    if name == 'AutoContrast':
      return self.auto_contrast.augment_images(images)
    if name == 'Equalize':
      return self.equalize.augment_images(images)
    if name == 'Invert':
      return self.invert.transform_images(
          images, {'apply_inversion': tf.ones([n], tf.bool)}, training=True)
    if name == 'Posterize':
      return self.posterize.augment_image(images)
    if name == 'Solarize':
      return self.solarize.augment_images(
          images, {'thresholds': per_image(float(arg)),
                   'additions': per_image(0.0)})
    # keras-cv degeneration/sharpness blend towards the degenerate image with
    # weight t; PIL's enhance factor f blends away from it: t = 1 - f.
    if name == 'Color':
      return self.color.augment_images(images, per_image(1.0 - arg))
    if name == 'Sharpness':
      return self.sharpness.augment_images(images, per_image(1.0 - arg))
    if name == 'Contrast':
      return self.contrast.augment_images(images, per_image(arg))
    if name == 'Brightness':
      # Our own op: keras-cv's and Keras' RandomBrightness add a delta, PIL's
      # Brightness (released `brightness`: blend with black) multiplies.
      return tf.clip_by_value(images * arg, 0.0, MAX_PIXEL)
    if name == 'Rotate':
      angles = sign * (arg * math.pi / 180.0)
      return self.rotate.augment_images(images, {'angles': angles})
    if name in ('ShearX', 'ShearY'):
      shear = (sign * arg)[:, None]
      if name == 'ShearX':
        return self.shear.augment_images(
            images, {'shear_x': shear, 'shear_y': None})
      return self.shear.augment_images(
          images, {'shear_x': None, 'shear_y': shear})
    if name in ('TranslateX', 'TranslateY'):
      # keras-cv takes fractions of the image size.
      height, width = images.shape[1], images.shape[2]
      zeros = tf.zeros([n, 1])
      if name == 'TranslateX':
        moves = {'width_translations': (sign * arg / width)[:, None],
                 'height_translations': zeros}
      else:
        moves = {'width_translations': zeros,
                 'height_translations': (sign * arg / height)[:, None]}
      return self.translate.augment_images(images, moves)
    if name == 'Cutout':
      if arg <= 0:
        return images
      height, width = images.shape[1], images.shape[2]
      # Centre uniform over the image, square clipped at the border.
      rows = tf.cast(draws[:, _CUTOUT_ROW] * height, tf.int32)
      columns = tf.cast(draws[:, _CUTOUT_COLUMN] * width, tf.int32)
      side = tf.fill([n], 2 * int(arg))
      return self.cutout.augment_images(
          images, {'centers_x': columns, 'centers_y': rows,
                   'rectangles_height': side, 'rectangles_width': side})
    if name == 'SamplePairing':
      # Our own op (no keras-cv/Keras layer): a convex blend with another
      # image of the batch, weight `arg` on the partner.
      if arg <= 0:
        return images
      partners = partners_fn(draws[:, _PARTNER])
      return tf.clip_by_value((1.0 - arg) * images + arg * partners, 0.0,
                              MAX_PIXEL)
    raise ValueError(f'Unknown RandAugment op {name!r}.')
