"""The progress line: "measuring" until a rate exists, then rate and ETA.

The clock is faked, so the expected rate and ETA are computed by hand.
"""

import io
import unittest
from unittest import mock

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


if __name__ == '__main__':
  unittest.main()
