"""Helpers shared by the test files."""

import hashlib
import os
import shutil
import tempfile
from typing import Dict

import tensorflow as tf

from mpl_tf import storage


def file_hashes(root: str) -> Dict[str, str]:
  """{path relative to root: SHA-256} of every file under root.

  What a refused command must leave exactly as it was: equal before and
  after means no file was added, removed or changed (directories holding
  no file are not seen).
  """
  _, files = storage.list_files(root)
  return {name: hashlib.sha256(storage.read_bytes(os.path.join(root, name)))
          .hexdigest() for name in files}


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
