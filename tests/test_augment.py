"""Tests of RandAugment (mpl_tf/data/randaugment.py and randaugment_ops.py).

Each op is checked against an independent numpy computation of what the
released code does (where that is cheap), eagerly and inside `tf.data`; the
magnitude mapping against the numbers of the spec's table; and the sampling
(per-image ops, per-image probability in [0.2, 0.8], seeds) statistically.
"""

import numpy as np
import tensorflow as tf

from mpl_tf.data import randaugment as ra
from mpl_tf.data import randaugment_ops as ra_ops

ALL_OPS = sorted({op for names in ra.OP_LISTS.values() for op in names})
CIFAR = dict(translate_const=4.0, cutout_const=4.0)
IMAGENET = dict(translate_const=100.0, cutout_const=40.0)
SIZE = 32


def _random_images(n=8, low=0, high=256, seed=0):
  """Integer-valued float32 images, like a crop of uint8 CIFAR images."""
  rng = np.random.RandomState(seed)
  return rng.randint(low, high, (n, SIZE, SIZE, 3)).astype(np.float32)


def _shift(image, rows, columns):
  """`image` moved by (rows, columns) pixels, vacated pixels filled 128."""
  out = np.full_like(image, 128.0)
  src = image[max(0, -rows):SIZE - max(0, rows),
              max(0, -columns):SIZE - max(0, columns)]
  out[max(0, rows):max(0, rows) + src.shape[0],
      max(0, columns):max(0, columns) + src.shape[1]] = src
  return out


def _shear(image, shear, axis):
  """Released shear_x/shear_y: output (r, c) reads the input at the sheared
  point, rounded to the nearest pixel (nearest interpolation), else 128."""
  rows, columns = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing='ij')
  if axis == 'x':
    src_rows, src_columns = rows, np.round(columns + shear * rows)
  else:
    src_rows, src_columns = np.round(rows + shear * columns), columns
  inside = ((src_rows >= 0) & (src_rows < SIZE) & (src_columns >= 0)
            & (src_columns < SIZE))
  src = image[np.clip(src_rows, 0, SIZE - 1).astype(int),
              np.clip(src_columns, 0, SIZE - 1).astype(int)]
  return np.where(inside[..., None], src, 128.0)


def _equalize_released(image):
  """The released code's (PIL's) equalize, per channel, in numpy."""
  out = np.empty_like(image)
  for c in range(3):
    channel = image[..., c].astype(np.int64)
    hist = np.bincount(channel.ravel(), minlength=256)
    nonzero = hist[hist > 0]
    step = (nonzero.sum() - nonzero[-1]) // 255
    if step == 0:
      out[..., c] = channel
      continue
    lut = (np.cumsum(hist) + step // 2) // step
    lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255)
    out[..., c] = lut[channel]
  return out


class OpArgumentsTest(tf.test.TestCase):
  """The level -> strength mapping against the spec's table (section 4.3)."""

  def test_cifar_m16(self):
    args = ra_ops.op_arguments(16, **CIFAR)
    self.assertAllClose(args['Rotate'], 48.0)
    self.assertEqual(args['Posterize'], 6)
    self.assertEqual(args['Solarize'], 409)
    for name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
      self.assertAllClose(args[name], 2.98)
    self.assertAllClose(args['ShearX'], 0.48)
    self.assertAllClose(args['ShearY'], 0.48)
    self.assertAllClose(args['TranslateX'], 6.4)
    self.assertAllClose(args['TranslateY'], 6.4)
    self.assertEqual(2 * args['Cutout'], 12)  # A 12 x 12 square.
    self.assertAllClose(args['SamplePairing'], 0.4)
    for name in ('AutoContrast', 'Equalize', 'Invert'):
      self.assertIsNone(args[name])

  def test_imagenet_m17(self):
    args = ra_ops.op_arguments(17, **IMAGENET)
    self.assertAllClose(args['Rotate'], 51.0)
    self.assertEqual(args['Posterize'], 6)
    self.assertEqual(args['Solarize'], 435)
    self.assertAllClose(args['Color'], 3.16)
    self.assertAllClose(args['ShearX'], 0.51)
    self.assertAllClose(args['TranslateX'], 170.0)
    self.assertEqual(2 * args['Cutout'], 136)

  def test_level_zero_and_posterize_clamp(self):
    args = ra_ops.op_arguments(0, **CIFAR)
    self.assertAllClose(args['Color'], 0.1)  # Not the identity factor 1.
    self.assertEqual(args['Solarize'], 0)
    # TF clamps the released uint8 shift by 8 to 7: one bit survives.
    self.assertEqual(args['Posterize'], 1)
    self.assertEqual(ra_ops.op_arguments(30, **CIFAR)['Posterize'], 8)
    for name in ra_ops.IDENTITY_AT_ZERO_MAGNITUDE:
      self.assertEqual(args[name], 0)

  def test_op_lists(self):
    self.assertEqual(len(ra.OP_LISTS['paper']), 15)
    self.assertEqual(len(ra.OP_LISTS['svhn']), 12)
    self.assertEqual(len(ra.OP_LISTS['released_code']), 15)
    for ops in ra.OP_LISTS.values():
      self.assertEqual(len(set(ops)), len(ops))
    common = {'AutoContrast', 'Brightness', 'Color', 'Contrast', 'Equalize',
              'Invert', 'Sharpness', 'Posterize', 'Solarize', 'ShearX',
              'ShearY', 'TranslateY'}
    self.assertEqual(set(ra.OP_LISTS['svhn']), common)
    self.assertEqual(set(ra.OP_LISTS['paper']),
                     common | {'SamplePairing', 'Rotate', 'TranslateX'})
    self.assertEqual(set(ra.OP_LISTS['released_code']),
                     common | {'Cutout', 'Rotate', 'TranslateX'})


class OpTest(tf.test.TestCase):
  """Every op alone, at the mapped magnitude, against numpy."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.images = _random_images()
    # No pixel is 128 or above 100, so fills and thresholds are visible.
    cls.dark = _random_images(low=0, high=101, seed=1)

  def _op(self, name, images=None, magnitude=16, consts=None, seed=3):
    images = self.images if images is None else images
    return ra.apply_op(images, name, magnitude, seed=seed,
                       **(consts or CIFAR)).numpy()

  def test_every_op_eager_and_in_tf_data(self):
    eager = {name: self._op(name) for name in ALL_OPS}
    dataset = tf.data.Dataset.from_tensors(self.images).map(
        lambda x: {name: ra.apply_op(x, name, 16, seed=3, **CIFAR)
                   for name in ALL_OPS})
    in_data = next(dataset.as_numpy_iterator())
    for name in ALL_OPS:
      for out in (eager[name], in_data[name]):
        self.assertEqual(out.shape, self.images.shape, name)
        self.assertEqual(out.dtype, np.float32, name)
        self.assertBetween(float(out.min()), 0.0, 255.0)
        self.assertBetween(float(out.max()), 0.0, 255.0)
      self.assertAllEqual(eager[name], in_data[name])

  def test_invert(self):
    self.assertAllEqual(self._op('Invert'), 255.0 - self.images)

  def test_posterize(self):
    as_int = self.images.astype(np.uint8)
    self.assertAllEqual(self._op('Posterize'), (as_int >> 2) << 2)  # 6 bits.
    self.assertAllEqual(self._op('Posterize', magnitude=0),
                        (as_int >> 7) << 7)  # 1 bit.

  def test_solarize(self):
    # Threshold 409 at M=16: no pixel reaches it, as in the released code.
    self.assertAllEqual(self._op('Solarize'), self.images)
    # M=5: threshold 128.
    expected = np.where(self.images < 128, self.images, 255 - self.images)
    self.assertAllEqual(self._op('Solarize', magnitude=5), expected)

  def test_auto_contrast(self):
    image = np.zeros((1, SIZE, SIZE, 3), np.float32)
    image[..., 0] = np.linspace(40, 160, SIZE)[None, :]
    image[..., 1] = 77.0  # A flat channel stays as it is.
    image[..., 2] = np.linspace(0, 255, SIZE)[:, None]
    expected = image.copy()
    expected[..., 0] = (image[..., 0] - 40) * 255.0 / 120.0
    self.assertAllClose(self._op('AutoContrast', image), expected, atol=1e-3)

  def test_equalize(self):
    # Eight values per channel, 128 pixels each: every non-empty bin has the
    # same count, so keras-cv's step (smallest bin) equals PIL's (last bin).
    rng = np.random.RandomState(2)
    values = np.repeat(np.arange(10, 90, 10), SIZE * SIZE // 8)
    image = np.stack([rng.permutation(values).reshape(SIZE, SIZE)
                      for _ in range(3)], -1).astype(np.float32)[None]
    self.assertAllEqual(self._op('Equalize', image),
                        _equalize_released(image[0])[None])

  def test_brightness(self):
    self.assertAllClose(self._op('Brightness'),
                        np.clip(self.images * 2.98, 0, 255), atol=1e-3)

  def test_color(self):
    gray = (self.images @ np.array([0.2989, 0.587, 0.114]))[..., None]
    expected = np.clip(gray + 2.98 * (self.images - gray), 0, 255)
    self.assertAllClose(self._op('Color'), expected, atol=0.05)

  def test_contrast(self):
    # keras-cv's contrast: around each image's per-channel mean, clipped.
    mean = self.images.mean(axis=(1, 2), keepdims=True)
    expected = np.clip(mean + 2.98 * (self.images - mean), 0, 255)
    self.assertAllClose(self._op('Contrast'), expected, atol=1e-2)

  def test_sharpness(self):
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13.0
    smooth = self.images.copy()
    inner = sum(kernel[i, j] * self.images[:, i:SIZE - 2 + i, j:SIZE - 2 + j]
                for i in range(3) for j in range(3))
    smooth[:, 1:-1, 1:-1] = np.clip(inner, 0, 255)  # Borders stay original.
    expected = np.clip(smooth + 2.98 * (self.images - smooth), 0, 255)
    self.assertAllClose(self._op('Sharpness'), expected, atol=1e-2)

  def test_translate(self):
    # 6.4 px with nearest sampling moves content by 6 px, either direction.
    for name in ('TranslateX', 'TranslateY'):
      out = self._op(name, self.dark)
      signs = set()
      for image, result in zip(self.dark, out):
        matches = [k for k in (6, -6) if np.array_equal(
            result, _shift(image, *((0, k) if name == 'TranslateX'
                                    else (k, 0))))]
        self.assertLen(matches, 1, name)
        signs.add(matches[0])
      self.assertLen(signs, 2, f'{name}: the sign is random per image')

  def test_rotate(self):
    # M=30 maps to 90 degrees, which nearest sampling makes an exact rot90.
    out = self._op('Rotate', self.dark, magnitude=30)
    for image, result in zip(self.dark, out):
      self.assertTrue(any(np.array_equal(result, np.rot90(image, k))
                          for k in (1, -1)))
    out = self._op('Rotate', self.dark)  # 48 degrees: gray corners.
    self.assertAllEqual(out[:, 0, 0], np.full((8, 3), 128.0))

  def test_shear(self):
    for name, axis in (('ShearX', 'x'), ('ShearY', 'y')):
      out = self._op(name, self.dark)
      for image, result in zip(self.dark, out):
        self.assertTrue(any(np.array_equal(result, _shear(image, s, axis))
                            for s in (0.48, -0.48)), name)

  def test_cutout(self):
    out = self._op('Cutout', self.dark, seed=5)
    for result in out:
      mask = (result == 128.0).all(-1)
      rows = np.flatnonzero(mask.any(1))
      columns = np.flatnonzero(mask.any(0))
      box = mask[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
      self.assertTrue(box.all())
      self.assertEqual(mask.sum(), box.size)
      for extent in (rows, columns):  # 12 px unless cut by the border.
        touches = extent[0] == 0 or extent[-1] == SIZE - 1
        self.assertLessEqual(len(extent), 12)
        if not touches:
          self.assertLen(extent, 12)
    # ImageNet constants: a 136 x 136 square covers a 32 x 32 image.
    self.assertAllEqual(self._op('Cutout', magnitude=17, consts=IMAGENET),
                        np.full_like(self.images, 128.0))

  def test_sample_pairing(self):
    for magnitude, weight in ((16, 0.4), (5, 0.2)):
      out = self._op('SamplePairing', magnitude=magnitude)
      for i, result in enumerate(out):
        partners = [j for j in range(len(self.images)) if np.allclose(
            result, (1 - weight) * self.images[i] + weight * self.images[j],
            atol=1e-3)]
        self.assertNotEmpty(partners)
        self.assertNotIn(i, partners)

  def test_magnitude_zero_is_identity_where_documented(self):
    for name in sorted(ra_ops.IDENTITY_AT_ZERO_MAGNITUDE):
      self.assertAllEqual(self._op(name, magnitude=0), self.images, name)
    # The enhance ops at M=0 use factor 0.1, which is not the identity.
    self.assertNotAllClose(self._op('Color', magnitude=0), self.images)


class RandAugmentTest(tf.test.TestCase):
  """Sampling, seeds and the public entry point."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.images = _random_images(n=32, low=20, high=200, seed=4)

  def _augment(self, images=None, op_list='paper', seed=11, **kwargs):
    kwargs = {'num_layers': 2, 'magnitude': 16, **CIFAR, **kwargs}
    images = self.images if images is None else images
    return ra.rand_augment(images, op_list, seed=seed, **kwargs)

  def test_each_list_eager_and_in_tf_data(self):
    for op_list in ra.OP_LISTS:
      eager = self._augment(op_list=op_list).numpy()
      dataset = tf.data.Dataset.from_tensor_slices(self.images).batch(8).map(
          lambda x, name=op_list: self._augment(x, op_list=name))
      batches = list(dataset.as_numpy_iterator())
      for out in [eager] + batches:
        self.assertEqual(out.dtype, np.float32)
        self.assertEqual(out.shape[1:], (SIZE, SIZE, 3))
        self.assertGreaterEqual(out.min(), 0.0)
        self.assertLessEqual(out.max(), 255.0)
      self.assertEqual(np.concatenate(batches).shape, self.images.shape)
      self.assertNotAllClose(eager, self.images)
    # The same seed, a different batch size: the first batch matches eager.
    self.assertAllEqual(batches[0], self._augment(
        self.images[:8], op_list='released_code').numpy())

  def test_dynamic_batch_in_tf_data(self):
    dataset = tf.data.Dataset.from_tensor_slices(self.images[:10]).batch(4)
    dataset = dataset.map(lambda x: self._augment(x, seed=None))
    self.assertEqual([b.shape[0] for b in dataset.as_numpy_iterator()],
                     [4, 4, 2])

  def test_images_follow_their_own_plan(self):
    # With one layer, each image is unchanged if its coin says so, and
    # otherwise shows the op it drew (checked for ops without random parts).
    ops = ra.OP_LISTS['paper']
    out = self._augment(num_layers=1).numpy()
    plan = ra.sample_plan(32, len(ops), 1, tf.constant([11, 0], tf.int64))
    chosen = set()
    for i in range(32):
      op = ops[int(plan['op_index'][0, i])]
      if not plan['applied'][0, i]:
        self.assertAllEqual(out[i], self.images[i])
        continue
      chosen.add(op)
      if op not in ra_ops.SIGNED_OPS and op != 'SamplePairing':
        self.assertAllClose(out[i], ra.apply_op(
            self.images[i:i + 1], op, 16, **CIFAR)[0], atol=1e-3, msg=op)
    self.assertGreater(len(chosen), 5)

  def test_ops_differ_across_images_of_a_batch(self):
    same = np.repeat(self.images[:1], 16, axis=0)
    out = self._augment(same, num_layers=1, seed=5).numpy()
    distinct = {out[i].tobytes() for i in range(16)}
    self.assertGreater(len(distinct), 4)
    plan = ra.sample_plan(16, 15, 2, tf.constant([5, 0], tf.int64))
    self.assertGreater(len(set(plan['op_index'].numpy().ravel())), 4)

  def test_probability_per_image(self):
    n = 20000
    plan = ra.sample_plan(n, 15, 2, tf.constant([1, 2], tf.int64))
    prob = plan['prob'].numpy()
    applied = plan['applied'].numpy()
    self.assertGreaterEqual(prob.min(), 0.2)
    self.assertLess(prob.max(), 0.8)
    self.assertAllClose(prob.mean(), 0.5, atol=0.01)
    # Both layers use the image's own p: P(applied | p) = p, bin by bin.
    for low in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
      in_bin = (prob >= low) & (prob < low + 0.1)
      self.assertAllClose(applied[:, in_bin].mean(), low + 0.05, atol=0.03)
    counts = np.bincount(plan['op_index'].numpy().ravel(), minlength=15)
    self.assertAllClose(counts / counts.sum(), np.full(15, 1 / 15),
                        atol=0.01)

  def test_seeds(self):
    first = self._augment(seed=3).numpy()
    self.assertAllEqual(first, self._augment(seed=3).numpy())
    self.assertAllEqual(first, self._augment(
        seed=tf.constant([3, 0], tf.int64)).numpy())
    self.assertNotAllClose(first, self._augment(seed=4).numpy())
    dataset = tf.data.Dataset.from_tensors(self.images).map(
        lambda x: self._augment(x, seed=3)).repeat(2)
    for out in dataset.as_numpy_iterator():
      self.assertAllEqual(out, first)
    self.assertNotAllClose(self._augment(seed=None).numpy(),
                           self._augment(seed=None).numpy())
    dataset = tf.data.Dataset.from_tensors(self.images).map(
        lambda x: self._augment(x, seed=None)).repeat(2)
    one, two = list(dataset.as_numpy_iterator())
    self.assertNotAllClose(one, two)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, r"op_list='cifar'.*use one of"):
      self._augment(op_list='cifar')
    with self.assertRaisesRegex(ValueError, 'magnitude=-1 must be .* >= 0'):
      self._augment(magnitude=-1)
    with self.assertRaisesRegex(ValueError, 'rank 4.*batch'):
      self._augment(self.images[0])
    with self.assertRaisesRegex(ValueError, 'float32.*tf.cast'):
      self._augment(self.images.astype(np.uint8))
    with self.assertRaisesRegex(ValueError, 'num_layers=-1'):
      self._augment(num_layers=-1)
    with self.assertRaisesRegex(ValueError, 'shape-\\[2\\]'):
      self._augment(seed=[1, 2, 3])


if __name__ == '__main__':
  tf.test.main()
