"""Test-wide setup that must run before TensorFlow executes any op.

Splitting the one CPU into two logical devices gives a real two-replica
MirroredStrategy for distribution tests on a machine without accelerators.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # pylint: disable=g-import-not-at-top

_cpus = tf.config.list_physical_devices('CPU')
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Drops tf.test.TestCase's inherited `test_session`, which is no test.

  Pytest collects it from every TestCase class and reports it as skipped,
  which would hide real skips in the summary.
  """
  items[:] = [item for item in items if item.name != 'test_session']
