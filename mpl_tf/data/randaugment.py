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
  does (`randaugment_ops.op_arguments`); ops with a direction get a random
  sign per image.

The ops themselves (each op's strength at level M and its image math, with
the behaviour decisions that differ from the released code) are in
`randaugment_ops.py`; this module draws and applies them.

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
import numbers
from typing import Dict, Tuple, Union

import tensorflow as tf

from mpl_tf.data import randaugment_ops

PROB_RANGE = (0.2, 0.8)  # Per-image application probability p ~ U(0.2, 0.8).

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

SeedLike = Union[None, int, tf.Tensor]


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
  draws = tf.random.stateless_uniform(
      [num_layers, batch_size, randaugment_ops.NUM_DRAWS], seeds[3])
  return {'prob': prob, 'op_index': op_index, 'applied': coin < prob[None],
          'draws': draws}


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


def _one_layer(images, ops: Tuple[str, ...], executor: randaugment_ops.Ops,
               group, draws):
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
def _executor(args_items: Tuple) -> randaugment_ops.Ops:
  return randaugment_ops.Ops(dict(args_items))


def _traced(height: int, width: int, body):
  """`body(images, seed)` as a tf.function of [None, height, width, 3]
  float32 images and a [2] seed, its input and output clipped to [0, 255]."""

  @tf.function(input_signature=[
      tf.TensorSpec([None, height, width, 3], tf.float32),
      tf.TensorSpec([2], tf.int64)])
  def run(images, seed):
    images = tf.clip_by_value(images, 0.0, randaugment_ops.MAX_PIXEL)
    return tf.clip_by_value(body(images, seed), 0.0,
                            randaugment_ops.MAX_PIXEL)

  return run


@functools.lru_cache(maxsize=None)
def _compiled_rand_augment(ops: Tuple[str, ...], num_layers: int,
                           args_items: Tuple, height: int, width: int):
  """One traced function per configuration and image size (batch is free)."""
  executor = _executor(args_items)

  def layers(images, seed):
    plan = sample_plan(tf.shape(images)[0], len(ops), num_layers, seed)
    for layer in range(num_layers):
      group = tf.where(plan['applied'][layer], plan['op_index'][layer],
                       len(ops))
      images = _one_layer(images, ops, executor, group, plan['draws'][layer])
      images = tf.ensure_shape(images, [None, height, width, 3])
    return images

  return _traced(height, width, layers)


@functools.lru_cache(maxsize=None)
def _compiled_single_op(name: str, args_items: Tuple, height: int,
                        width: int):
  executor = _executor(args_items)

  def one_op(images, seed):
    draws = tf.random.stateless_uniform(
        [tf.shape(images)[0], randaugment_ops.NUM_DRAWS], seed)
    positions = tf.range(tf.shape(images)[0])
    out = executor(name, images, draws,
                   functools.partial(_partner_images, images, positions))
    return tf.ensure_shape(tf.cast(out, tf.float32), [None, height, width, 3])

  return _traced(height, width, one_op)


def _args_key(magnitude, translate_const, cutout_const) -> Tuple:
  args = randaugment_ops.op_arguments(magnitude, translate_const, cutout_const)
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
    return tf.clip_by_value(images, 0.0, randaugment_ops.MAX_PIXEL)
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
