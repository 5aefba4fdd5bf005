"""Test-wide setup that must run before TensorFlow executes any op.

Splitting the one CPU into two logical devices gives a real two-replica
MirroredStrategy for distribution tests on a machine without accelerators.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# TensorFlow's oneDNN kernels off, for this process and the main.py
# processes tests start (they inherit this environment): on an AVX-512 CPU
# the two-replica MirroredStrategy on the split CPU computed the teacher's
# early-layer gradients 1.7e-3 (relative) away from the same step on one
# device per process, with or without oneDNN, and from itself without
# oneDNN, which all agree to 1e-6 (tests/test_multi_worker.py failed on it).
# The test's reference run, not the cluster, was the odd one out; with
# TensorFlow's own (Eigen) kernels both layouts agree to float32 rounding.
os.environ['TF_ENABLE_ONEDNN_OPTS'] = '0'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # pylint: disable=g-import-not-at-top

_cpus = tf.config.list_physical_devices('CPU')
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


# The longest modules (minutes each on 2 cores), started first: with the
# suite spread over worker processes (tasks.py test runs pytest-xdist), the
# longest jobs go out first and the short ones fill in, so no worker ends
# with a long module while the others sit idle.
_LONGEST_FIRST = ('test_multi_worker.py', 'test_presets.py',
                  'test_distribute.py', 'test_train.py', 'test_reliability.py')


def _start_order(item) -> int:
  name = os.path.basename(str(item.fspath))
  return (_LONGEST_FIRST.index(name) if name in _LONGEST_FIRST
          else len(_LONGEST_FIRST))


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Drops tf.test.TestCase's inherited `test_session`, which is no test;
  puts the longest modules first.

  Pytest collects `test_session` from every TestCase class and reports it as
  skipped, which would hide real skips in the summary.
  """
  items[:] = sorted((item for item in items if item.name != 'test_session'),
                    key=_start_order)
