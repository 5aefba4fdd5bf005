"""`prepare.py` loses nothing: refusals change nothing.

Issue 22's cases of the preparation command, in process (run_cli on a
30-image .npz): an --out_dir on ram:// is refused before any work (the set
would vanish with the process).
"""

import contextlib
import io
import os
import uuid
from unittest import mock

import numpy as np
import tensorflow as tf

import prepare as prepare_command
from mpl_tf import storage
from mpl_tf.data import prepare

def _write_npz(root):
  rng = np.random.default_rng(0)
  path = os.path.join(root, 'arrays.npz')
  np.savez(path, images=rng.integers(0, 256, (24, 8, 8, 3), np.uint8),
           labels=np.arange(24) % 3, test_labels=np.arange(6) % 3,
           test_images=rng.integers(0, 256, (6, 8, 8, 3), np.uint8))
  return path


def _flags(npz_path, out_dir, *extra):
  return ['prepare', '--source=npz', f'--npz_path={npz_path}',
          '--split_rule=custom', '--labeled_per_class=2',
          '--validation_per_class=1', f'--out_dir={out_dir}', *extra]


def _run_cli(argv):
  """(exit status, stderr) of the command, in this process."""
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(
      io.StringIO()):
    status = prepare_command.run_cli(argv)
  return status, stderr.getvalue()


class RamOutDirTest(tf.test.TestCase):

  def test_ram_out_dir_is_refused_before_any_work(self):
    # Issue 22: `--out_dir=ram://...` exited 0 and the set was gone when
    # the process ended; main.py and prepare.py then sent the user to each
    # other.
    npz = _write_npz(self.get_temp_dir())
    root = f'ram://prepare_safety_{uuid.uuid4().hex[:8]}'
    out_dir = f'{root}/out'
    with mock.patch.object(prepare, '_open_source',
                           side_effect=AssertionError('work started')):
      status, stderr = _run_cli(_flags(npz, out_dir))
    self.assertEqual(status, 2, stderr)
    lines = [line for line in stderr.splitlines() if line.startswith('error:')]
    self.assertLen(lines, 1, stderr)
    self.assertIn(f'--out_dir={out_dir} is on ram://', lines[0])
    self.assertIn('lives only as long as the process', lines[0])
    self.assertFalse(tf.io.gfile.exists(root))
    # The helper the command uses, for the other commands' flags; the
    # library itself keeps writing to ram:// (tests/test_storage.py).
    for path in ('/data', 'data', 'gs://bucket/data', 's3://b/d'):
      self.assertTrue(storage.outlives_process(path), path)
    self.assertFalse(storage.outlives_process('ram://x'))
    with self.assertRaisesRegex(ValueError, '^--model_dir=ram://x is on'):
      storage.check_outlives_process('ram://x', 'model_dir')


if __name__ == '__main__':
  tf.test.main()
