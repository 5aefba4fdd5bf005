"""RandAugment with the op lists of the MPL paper's Table 5, for image batches.

Meta Pseudo Labels trains the teacher with UDA on a RandAugment view of each
unlabeled image. The paper lists the ops per dataset (Table 5); the released
code (`augment.RandAugment.distort`) fixes how the level M maps to each op's
strength and how ops are drawn. This module follows both, on whole batches:

* `N = num_layers` times, every image draws its own op uniformly from the list
  (not one op for the whole batch, which is what Keras 3's `RandAugment` does)
  and applies it with probability `p`, where `p ~ U(0.2, 0.8)` is drawn once per
  image and shared by its layers.
* M is fixed and mapped to a fixed strength per op exactly as the released code
  does (`op_arguments`); ops with a direction get a random sign per image.

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

Randomness: every draw is a stateless op keyed on one shape-[2] seed, so a fixed
`seed` gives identical outputs eagerly and inside `tf.data`; `seed=None` draws
that seed from the stateful global RNG, so calls differ.

Speed: per layer, the batch is split by op with `tf.dynamic_partition`, each op
runs once on its sub-batch, and `tf.dynamic_stitch` puts the images back, so a
layer costs about one op per image instead of all ops on the full batch. The
work runs in a cached `tf.function` (also when called eagerly) so that
keras-cv's `vectorized_map` is not re-traced on every eager call.
"""

import functools
import math
import numbers
from typing import Dict, Optional, Tuple, Union

import tensorflow as tf

MAX_LEVEL = 10.0  # The released code's levels are out of 10.
FILL_VALUE = 128.0  # Gray fill of geometric ops and Cutout (released code).
MAX_PIXEL = 255.0
PROB_RANGE = (0.2, 0.8)  # Per-image application probability p ~ U(0.2, 0.8).
SAMPLE_PAIRING_MAX_WEIGHT = 0.4  # AutoAugment's SamplePairing range [0, 0.4].

OP_LISTS = {
    # Table 5, CIFAR-10 and ImageNet.
    'paper': ('AutoContrast', 'Brightness', 'Color', 'Contrast', 'Equalize',
              'Invert', 'Sharpness', 'Posterize', 'SamplePairing', 'Solarize',
              'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'),
    # Table 5, SVHN: no SamplePairing, Rotate or TranslateX.
    'svhn': ('AutoContrast', 'Brightness', 'Color', 'Contrast', 'Equalize',
             'Invert', 'Sharpness', 'Posterize', 'Solarize', 'ShearX',
             'ShearY', 'TranslateY'),
    # `augment.RandAugment`'s default `available_ops`, in its order.
    'released_code': ('AutoContrast', 'Equalize', 'Invert', 'Rotate',
                      'Posterize', 'Solarize', 'Color', 'Contrast',
                      'Brightness', 'Sharpness', 'ShearX', 'ShearY',
                      'TranslateX', 'TranslateY', 'Cutout'),
}

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
_NUM_DRAWS = 4

SeedLike = Union[None, int, tf.Tensor]


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


def _check_op_list(op_list: str) -> Tuple[str, ...]:
  if op_list not in OP_LISTS:
    raise ValueError(f'op_list={op_list!r} is unknown; use one of '
                     f'{sorted(OP_LISTS)} (Table 5 of the paper, or the '
                     f'released code\'s list).')
  return OP_LISTS[op_list]


def _check_images(images: tf.Tensor) -> tf.Tensor:
  """Returns `images` as a tensor after checking rank, size and dtype."""
  images = tf.convert_to_tensor(images)
  if images.shape.rank != 4:
    raise ValueError(
        f'images must be a batch of rank 4 [N, H, W, 3], got shape '
        f'{images.shape}; batch the dataset before mapping RandAugment, or '
        f'add a batch axis with images[None].')
  if images.shape[1] is None or images.shape[2] is None:
    raise ValueError(f'images need a static height and width, got shape '
                     f'{images.shape}; resize or tf.ensure_shape first.')
  if images.shape[3] != 3:
    raise ValueError(f'images must have 3 (RGB) channels, got shape '
                     f'{images.shape}.')
  if images.dtype != tf.float32:
    raise ValueError(f'images must be float32 on the 0..255 scale, got '
                     f'{images.dtype.name}; use tf.cast(images, tf.float32).')
  return images


def _seed_tensor(seed: SeedLike) -> tf.Tensor:
  """A shape-[2] int64 seed for stateless ops.

  With `seed=None` the seed comes from the stateful global RNG: that op keeps
  its state across calls of a traced function and across `tf.data` elements,
  so every call gets fresh randomness.
  """
  if seed is None:
    return tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int64)
  if isinstance(seed, bool):
    raise ValueError(f'seed={seed!r} must be an int or a shape-[2] int '
                     f'tensor, or None for fresh randomness per call.')
  seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
  if seed.shape.rank == 0:
    return tf.stack([seed, tf.constant(0, tf.int64)])
  if seed.shape.as_list() != [2]:
    raise ValueError(f'seed must be an int or a shape-[2] int tensor (as for '
                     f'tf.random.stateless_uniform), got shape {seed.shape}.')
  return seed


def sample_plan(batch_size, num_ops: int, num_layers: int,
                seed: tf.Tensor) -> Dict[str, tf.Tensor]:
  """The per-image random choices of one RandAugment call.

  Exposed so tests (and curious users) can check the sampling directly: each
  image draws its own op per layer and its own probability p.

  Args:
    batch_size: N, Python int or scalar int tensor.
    num_ops: size of the op list.
    num_layers: number of ops applied in sequence.
    seed: shape-[2] int seed; `rand_augment(..., seed=s)` uses [s, 0].

  Returns:
    'prob' [N] in [0.2, 0.8); 'op_index' [L, N] int32 in [0, num_ops);
    'applied' [L, N] bool (uniform < prob); 'draws' [L, N, 4] uniform [0, 1)
    used for signs, Cutout centres and SamplePairing partners.
  """
  seeds = tf.random.experimental.stateless_split(seed, 4)
  prob = tf.random.stateless_uniform([batch_size], seeds[0], PROB_RANGE[0],
                                     PROB_RANGE[1])
  op_index = tf.random.stateless_uniform([num_layers, batch_size], seeds[1],
                                         0, num_ops, dtype=tf.int32)
  coin = tf.random.stateless_uniform([num_layers, batch_size], seeds[2])
  draws = tf.random.stateless_uniform([num_layers, batch_size, _NUM_DRAWS],
                                      seeds[3])
  return {'prob': prob, 'op_index': op_index, 'applied': coin < prob[None],
          'draws': draws}


class _Ops:
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


def _partner_images(batch: tf.Tensor, positions: tf.Tensor,
                    draws: tf.Tensor) -> tf.Tensor:
  """For each image at `positions`, another image of `batch` (itself if N=1).

  The partner is position + k mod N with k uniform in 1..N-1, so it is never
  the image itself when the batch has more than one image.
  """
  n = tf.shape(batch)[0]
  shift = 1 + tf.cast(draws * tf.cast(tf.maximum(n - 1, 0), tf.float32),
                      tf.int32)
  shift = tf.minimum(shift, tf.maximum(n - 1, 1))
  return tf.gather(batch, (positions + shift) % n)


def _one_layer(images, ops: Tuple[str, ...], executor: _Ops, group, draws):
  """Applies op `group[i]` to image i; group == len(ops) means unchanged."""
  num_groups = len(ops) + 1
  positions = tf.range(tf.shape(images)[0])
  image_parts = tf.dynamic_partition(images, group, num_groups)
  position_parts = tf.dynamic_partition(positions, group, num_groups)
  draw_parts = tf.dynamic_partition(draws, group, num_groups)
  outputs = []
  for k, name in enumerate(ops):
    partners_fn = functools.partial(_partner_images, images,
                                    position_parts[k])
    # Skip ops with no image this layer: keras-cv's Equalization (pfor over
    # images) fails on an empty batch, and the others would only waste time.
    out = tf.cond(
        tf.size(position_parts[k]) > 0,
        functools.partial(executor, name, image_parts[k], draw_parts[k],
                          partners_fn),
        functools.partial(tf.identity, image_parts[k]))
    outputs.append(tf.cast(out, tf.float32))
  outputs.append(image_parts[-1])
  return tf.dynamic_stitch(position_parts, outputs)


@functools.lru_cache(maxsize=None)
def _executor(args_items: Tuple) -> _Ops:
  return _Ops(dict(args_items))


@functools.lru_cache(maxsize=None)
def _compiled_rand_augment(ops: Tuple[str, ...], num_layers: int,
                           args_items: Tuple, height: int, width: int):
  """One traced function per configuration and image size (batch is free)."""
  executor = _executor(args_items)

  @tf.function(input_signature=[
      tf.TensorSpec([None, height, width, 3], tf.float32),
      tf.TensorSpec([2], tf.int64)])
  def run(images, seed):
    images = tf.clip_by_value(images, 0.0, MAX_PIXEL)
    plan = sample_plan(tf.shape(images)[0], len(ops), num_layers, seed)
    for layer in range(num_layers):
      group = tf.where(plan['applied'][layer], plan['op_index'][layer],
                       len(ops))
      images = _one_layer(images, ops, executor, group, plan['draws'][layer])
      images = tf.ensure_shape(images, [None, height, width, 3])
    return tf.clip_by_value(images, 0.0, MAX_PIXEL)

  return run


@functools.lru_cache(maxsize=None)
def _compiled_single_op(name: str, args_items: Tuple, height: int,
                        width: int):
  executor = _executor(args_items)

  @tf.function(input_signature=[
      tf.TensorSpec([None, height, width, 3], tf.float32),
      tf.TensorSpec([2], tf.int64)])
  def run(images, seed):
    images = tf.clip_by_value(images, 0.0, MAX_PIXEL)
    draws = tf.random.stateless_uniform([tf.shape(images)[0], _NUM_DRAWS],
                                        seed)
    positions = tf.range(tf.shape(images)[0])
    out = executor(name, images, draws,
                   functools.partial(_partner_images, images, positions))
    out = tf.ensure_shape(tf.cast(out, tf.float32), [None, height, width, 3])
    return tf.clip_by_value(out, 0.0, MAX_PIXEL)

  return run


def _args_key(magnitude, translate_const, cutout_const) -> Tuple:
  args = op_arguments(magnitude, translate_const, cutout_const)
  return tuple(sorted(args.items()))


def rand_augment(images: tf.Tensor, op_list: str, num_layers: int,
                 magnitude: float, translate_const: float,
                 cutout_const: float, seed: SeedLike = None) -> tf.Tensor:
  """RandAugment(N, M) with a Table 5 op list, on a batch of images.

  Runs eagerly or inside a `tf.data` map after batching. Each image draws its
  own ops and its own application probability (see the module docstring for
  the sampling, the strengths and every deviation from the released code).

  Args:
    images: float32 [N, H, W, 3] on 0..255, static H and W (N may be dynamic).
    op_list: 'paper' (CIFAR-10/ImageNet), 'svhn' or 'released_code'.
    num_layers: N, ops applied in sequence per image (0 returns the input
      clipped to [0, 255]).
    magnitude: M in the released code's levels out of 10 (16 CIFAR, 17
      ImageNet); a Python number.
    translate_const: TranslateX/Y pixels at M = 10 (4 CIFAR, 100 ImageNet).
    cutout_const: Cutout half-side at M = 10 (4 CIFAR, 40 ImageNet); used by
      'released_code' only.
    seed: None for fresh randomness on every call; an int or a shape-[2] int
      tensor for reproducible output. Inside `tf.data`, a fixed seed repeats
      the same draws for every batch, so derive one seed per batch (e.g.
      `tf.random.experimental.stateless_fold_in(seed, batch_index)`).

  Returns:
    float32 images of the input's shape, values in [0, 255].

  Raises:
    ValueError: for an unknown op_list, a negative magnitude or constant, a
      negative num_layers, images not float32 [N, H, W, 3], or a bad seed.
  """
  ops = _check_op_list(op_list)
  if (not isinstance(num_layers, numbers.Integral)
      or isinstance(num_layers, bool) or num_layers < 0):
    raise ValueError(f'num_layers={num_layers!r} must be a Python int >= 0 '
                     f'(2 in the paper).')
  args_key = _args_key(magnitude, translate_const, cutout_const)
  images = _check_images(images)
  seed = _seed_tensor(seed)
  if num_layers == 0:
    return tf.clip_by_value(images, 0.0, MAX_PIXEL)
  run = _compiled_rand_augment(ops, int(num_layers), args_key,
                               images.shape[1], images.shape[2])
  return tf.ensure_shape(run(images, seed), images.shape)


def apply_op(images: tf.Tensor, op_name: str, magnitude: float,
             translate_const: float = 4.0, cutout_const: float = 4.0,
             seed: SeedLike = None) -> tf.Tensor:
  """Applies one RandAugment op to every image, at level `magnitude`.

  The same code path as `rand_augment` uses per image, exposed so each op can
  be tested and inspected on its own. Random parts (sign, Cutout centre,
  SamplePairing partner) are drawn per image from `seed`.
  """
  all_ops = {op for names in OP_LISTS.values() for op in names}
  if op_name not in all_ops:
    raise ValueError(f'op_name={op_name!r} is unknown; use one of '
                     f'{sorted(all_ops)}.')
  args_key = _args_key(magnitude, translate_const, cutout_const)
  images = _check_images(images)
  seed = _seed_tensor(seed)
  run = _compiled_single_op(op_name, args_key, images.shape[1],
                            images.shape[2])
  return tf.ensure_shape(run(images, seed), images.shape)
