"""The arithmetic of docs/compute.md's "What fits where" table.

benchmarks/activation_memory.py measures the MPL step's memory at small
batches (minutes, not run here) and scales it; what is checked here is the
arithmetic it scales with, on a made-up network and made-up numbers, and
that its list of presets still says what flags/*.cfg say.
"""

import os
import sys
import unittest

import keras

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import activation_memory  # pylint: disable=g-import-not-at-top,wrong-import-position


def _flag_values(path: str) -> dict:
  values = {}
  with open(path) as f:
    for line in f:
      if line.startswith('--') and '=' in line:
        key, value = line[2:].strip().split('=', 1)
        values[key] = value
  return values


class ActivationElementsTest(unittest.TestCase):

  def test_counts_every_layer_output_per_image(self):
    images = keras.Input((8, 6, 3))
    conv = keras.layers.Conv2D(4, 3, strides=2, padding='same')(images)
    normed = keras.layers.BatchNormalization()(conv)
    relu = keras.layers.ReLU()(normed)
    added = keras.layers.Add()([relu, conv])
    pooled = keras.layers.GlobalAveragePooling2D()(added)
    logits = keras.layers.Dense(5)(pooled)
    model = keras.Model(images, logits)
    # By hand: conv, batch norm, relu and add each 4 x 3 x 4 = 48 (strided
    # 8 x 6 -> 4 x 3), pooling 4, dense 5; the input and the batch not.
    self.assertEqual(activation_memory.activation_elements(model),
                     4 * 48 + 4 + 5)

  def test_the_scale_factor_is_the_ratio_of_counts(self):
    def net(size):
      images = keras.Input((size, size, 3))
      return keras.Model(images, keras.layers.Conv2D(2, 1)(images))
    small = activation_memory.activation_elements(net(4))
    large = activation_memory.activation_elements(net(12))
    self.assertEqual((small, large), (32, 288))
    self.assertEqual(large / small, 9.0)


class FitAndFitsTest(unittest.TestCase):

  def test_line_through_exact_points(self):
    fixed, slope = activation_memory.fit_line([1, 2, 4], [7.0, 10.0, 16.0])
    self.assertAlmostEqual(fixed, 4.0)
    self.assertAlmostEqual(slope, 3.0)
    with self.assertRaises(ValueError):
      activation_memory.fit_line([2, 2], [1.0, 3.0])

  def test_smallest_k_divides_the_batch_and_uses_each_modes_costs(self):
    # K=1: fixed 10, 4 per image; K>1: fixed 12, 3 per image of a chunk.
    costs = {'k1': (10.0, 4.0), 'chunk': (12.0, 3.0)}
    self.assertEqual(activation_memory.replica_bytes(costs, 12, 1), 58.0)
    self.assertEqual(activation_memory.replica_bytes(costs, 12, 3), 24.0)
    # Usable = 0.75 * capacity. 12 images: K=1 58, K=2 30, K=3 24, K=4 21,
    # K=6 18, K=12 15; 5 would need 19.2 but does not divide 12.
    cases = {80: 1, 40: 2, 32: 3, 28: 4, 25.6: 6, 24: 6, 20: 12, 19.9: None}
    for capacity, expected in cases.items():
      self.assertEqual(activation_memory.smallest_k(costs, 12, capacity,
                                                    0.25), expected,
                       capacity)


class PresetsTest(unittest.TestCase):

  def test_the_table_describes_the_presets_as_written(self):
    for (preset, model, _, size, batch, mu, precision, _,
         _) in activation_memory.PRESETS:
      for name in preset.replace(' + mixed', '').split(', '):
        values = _flag_values(os.path.join(REPO, 'flags', f'{name}.cfg'))
        self.assertEqual(
            (values['model'], int(values.get('image_size', 32)),
             int(values['labeled_batch_size']), int(values['uda_ratio'])),
            (model, size, batch, mu), name)
        if not preset.endswith(' + mixed'):
          self.assertEqual(values.get('precision', 'float32'), precision,
                           name)


if __name__ == '__main__':
  unittest.main()
