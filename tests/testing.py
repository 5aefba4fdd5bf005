"""Helpers shared by the test files."""

import hashlib
import os
import contextlib
import io
import shutil
import struct
import tempfile
import zlib
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


def png_announcing(width: int, height: int) -> bytes:
  """A small PNG whose header announces width x height RGB pixels.

  Its image data are a few bytes, so a decoder that trusts the header
  allocates the whole image before it finds them short: what a small file
  that decodes to gigabytes looks like to a reader of headers.
  """
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack('>I', len(data)) + kind + data +
            struct.pack('>I', zlib.crc32(kind + data)))
  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) +
          chunk(b'IDAT', zlib.compress(b'\x00' * 64)) + chunk(b'IEND', b''))


def run_cli_in_process(run_cli, argv):
  """(exit status, stderr) of a root command's run_cli(argv), stdout dropped.

  The commands (prepare.py, experiment.py) return their status instead of
  exiting, so their bad-input answers are tested without a process start.
  """
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(
      io.StringIO()):
    status = run_cli(list(argv))
  return status, stderr.getvalue()


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
