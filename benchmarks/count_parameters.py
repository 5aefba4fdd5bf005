"""Prints the parameter count of every network `build_model` knows.

Usage (from the repository root):
  .venv/bin/python benchmarks/count_parameters.py [model names...]

Counts come from `mpl_tf.models.count_parameters`, which builds each network
through the same code path as `build_model` but without allocating weights,
so the 480M-parameter EfficientNet-L2 takes seconds and no memory. The table
it prints is the one recorded in docs/models.md; tests/test_models.py pins
the exact numbers of a subset.
"""

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top
from mpl_tf.config import ModelConfig
from mpl_tf.models import count_parameters
from mpl_tf.models import efficientnet
# pylint: enable=g-import-not-at-top

# The released EfficientNet's stages: (repeats, kernel, filters, expansion).
_STAGES = ((1, 3, 16, 1), (2, 3, 24, 6), (2, 5, 40, 6), (3, 3, 80, 6),
           (3, 5, 112, 6), (4, 5, 192, 6), (1, 3, 320, 6))


def released_efficientnet_count(width: float, depth: float,
                                num_classes: int) -> int:
  """Trainable weights of the released `modeling.EfficientNet`, by arithmetic.

  An independent check on the Keras-built count: it repeats the released
  code's `_fil` (round to a multiple of 8, never more than 10% down) and
  `_rep` (ceil) and adds up each layer's kernel, bias and BN gamma/beta.
  """
  def filters(base):
    scaled = base * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded

  channels = filters(32)
  total = 3 * 3 * 3 * channels + 2 * channels                  # stem + BN
  for repeats, kernel, base, expansion in _STAGES:
    out = filters(base)
    for _ in range(math.ceil(depth * repeats)):
      expanded = channels * expansion
      if expansion != 1:
        total += channels * expanded + 2 * expanded            # expand + BN
      total += kernel * kernel * expanded + 2 * expanded       # depthwise + BN
      squeezed = max(1, int(channels * 0.25))                  # SE of input
      total += (expanded + 1) * squeezed + (squeezed + 1) * expanded
      total += expanded * out + 2 * out                        # project + BN
      channels = out
  head = filters(1280)
  return (total + channels * head + 2 * head + head * num_classes +
          num_classes)


# (name, classes, image size): the WRNs as on CIFAR-10, the rest on ImageNet.
DEFAULT_MODELS = (
    [('wrn-28-2', 10, 32), ('wrn-28-10', 10, 32), ('wrn-28-large', 10, 32),
     ('resnet-50', 1000, 224)] +
    [(name, 1000, 224) for name in efficientnet.VARIANTS])


def main(argv):
  models = DEFAULT_MODELS
  if argv[1:]:
    models = [m for m in DEFAULT_MODELS if m[0] in argv[1:]]
  print('| model | classes | trainable | BN statistics | total | '
        'closed form | seconds |')
  print('|---|---:|---:|---:|---:|---:|---:|')
  for name, num_classes, image_size in models:
    start = time.time()
    trainable, statistics = count_parameters(ModelConfig(name=name),
                                             num_classes, image_size)
    seconds = time.time() - start
    closed_form = '–'
    if name in efficientnet.VARIANTS:
      width, depth, _ = efficientnet.VARIANTS[name]
      closed_form = (
          f'{released_efficientnet_count(width, depth, num_classes):,}')
    print(f'| {name} | {num_classes:,} | {trainable:,} | {statistics:,} | '
          f'{trainable + statistics:,} | {closed_form} | {seconds:.1f} |')


if __name__ == '__main__':
  main(sys.argv)
