"""Helpers shared by the test files."""

import shutil
import tempfile

import tensorflow as tf


class DataDirTestCase(tf.test.TestCase):
  """A TestCase with one temporary data directory for the whole class.

  Runs on the offline sets prepare their data there once (on first use) and
  reuse it in every test of the class.
  """

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = tempfile.mkdtemp()

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.data_dir, ignore_errors=True)
    super().tearDownClass()
