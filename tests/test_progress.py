"""The console: the progress line and the configuration summary.

The progress line says "measuring" until a rate exists, then rate and ETA;
the clock is faked, so the expected rate and ETA are computed by hand. The
summary names data, network, algorithm and every MPL choice in two lines.
"""

import io
import unittest
from unittest import mock

from mpl_tf import config as config_lib
from mpl_tf import progress as progress_lib


class _Clock:

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


class ProgressTest(unittest.TestCase):

  def _lines(self, later_steps=0.0):
    clock, stream = _Clock(), io.StringIO()
    with mock.patch.object(progress_lib.time, 'time', clock):
      line = progress_lib.Progress('mpl', 600, 50, stream=stream,
                                   later_steps=later_steps)
      clock.now += 40.0            # the first loop: tracing and 50 steps
      line.update(50, {'mpl/h': 0.5})
      clock.now += 20.0            # 50 steps (and an evaluation) in 20 s
      line.update(100, {'mpl/h': 0.25})
    return stream.getvalue().splitlines()

  def test_first_loop_says_measuring_then_rate_and_eta(self):
    first, second = self._lines()
    self.assertEqual(first, 'mpl 50/600 | measuring steps/s | h=0.5')
    # 2.5 steps/s; 500 steps left: 200 s.
    self.assertEqual(second, 'mpl 100/600 | 2.50 steps/s | ETA 3m20s | '
                             'h=0.25')

  def test_eta_covers_the_later_phases(self):
    _, second = self._lines(later_steps=150.0)
    # 500 + 150 steps of this phase's cost at 2.5 steps/s: 260 s.
    self.assertIn('ETA 3m20s (all phases 4m20s)', second)


class SummaryTest(unittest.TestCase):

  def test_two_lines_name_the_data_network_and_every_mpl_choice(self):
    config = config_lib.Config(
        mpl=config_lib.MplConfig(pseudo_label='soft', feedback='taylor',
                                 feedback_sign='released_code',
                                 baseline_decay=0.99,
                                 baseline_init='uniform_sqrt3',
                                 ema_init='released_code',
                                 freeze_teacher_batch_norm_statistics=True,
                                 microbatches=4),
        finetune=config_lib.FinetuneConfig(steps=7))
    first, second = config.summary().splitlines()
    for part in ('train mpl: mnist5k (32x32, data/mnist5k)', 'wrn-28-2',
                 'B=16 mu=4 microbatches=4', '1000 steps, finetune 7 steps, supervised '
                 'baseline', 'one_device'):
      self.assertIn(part, first)
    for part in ('pseudo_label=soft', 'feedback=taylor',
                 'sign=released_code', 'baseline 0.99 (uniform_sqrt3)',
                 'mpl_weight=1.0', 'student_view=aug',
                 'ema_init=released_code', 'teacher_bn_statistics=frozen',
                 'UDA weight 1.0',
                 'T=0.7', 'threshold 0.6'):
      self.assertIn(part, second)

  def test_supervised_runs_have_no_mpl_line(self):
    config = config_lib.Config(run=config_lib.RunConfig(
        algorithm='supervised'))
    self.assertEqual(len(config.summary().splitlines()), 1)


if __name__ == '__main__':
  unittest.main()
