"""`prepare.py` loses nothing: refusals change nothing, kills leave nothing.

Issue 22's cases of the preparation command, in process (run_cli and
prepare.prepare on a 30-image .npz): an --out_dir on ram:// is refused
before any work (the set would vanish with the process), and a run killed
outright (SIGKILL: no `finally`, no clean-up) neither loses the set an
earlier run prepared nor leaves files that a later run does not remove.
A kill is reproduced by raising a BaseException that no handler of the
library catches, with the clean-up calls a SIGKILL would never reach made
no-ops, and with the process id of a process that no longer runs.
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
from mpl_tf.data import records
from tests.testing import file_hashes

# Above the kernel's pid_max (at most 2**22): never a running process.
_DEAD_PID = 2**22 + 12345


class _Killed(BaseException):
  """SIGKILL stand-in: `except Exception` and the library never catch it."""


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


@contextlib.contextmanager
def _killed_run():
  """A prepare that dies as under SIGKILL, as a process now gone."""
  with mock.patch.object(os, 'getpid', return_value=_DEAD_PID), \
       mock.patch.object(storage, 'rmtree'), \
       mock.patch.object(tf.io.gfile, 'remove'), \
       contextlib.suppress(_Killed):
    yield


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


class KilledRunTest(tf.test.TestCase):

  def test_a_killed_run_loses_nothing_and_the_next_run_clears_it(self):
    root = self.get_temp_dir()
    npz = _write_npz(root)
    out_dir = os.path.join(root, 'prepared')
    self.assertEqual(_run_cli(_flags(npz, out_dir))[0], 0)
    prepared = file_hashes(out_dir)
    # Names like the temporary ones, but not of hidden_sibling's form or of
    # another directory's, and one of a run still going (this process):
    # none of them is anybody's leftover to delete.
    kept = ['.prepared.tmp-notes', 'prepared.tmp-123', '.prepared.tmp-1-xyz',
            f'.other.tmp-{_DEAD_PID}-0123abcd',
            os.path.basename(storage.hidden_sibling(out_dir, 'tmp'))]
    for name in kept:
      os.makedirs(os.path.join(root, name))
      with open(os.path.join(root, name, 'mine'), 'w') as f:
        f.write('mine')

    # Killed while writing shards: a partial temporary shard and the hidden
    # directory stay behind; the earlier set is untouched.
    written = []
    def write_then_die(writer, encoded, label):
      written.append(label)
      if len(written) == 5:
        raise _Killed()
      return original_write(writer, encoded, label)
    original_write = records.SplitWriter.write
    with _killed_run(), mock.patch.object(records.SplitWriter, 'write',
                                          write_then_die):
      prepare.prepare(prepare.PrepareConfig(
          source='npz', npz_path=npz, split_rule='custom',
          labeled_per_class=2, validation_per_class=1, out_dir=out_dir,
          overwrite=True, seed=1))
    self.assertEqual(file_hashes(out_dir), prepared)
    leftover = [name for name in os.listdir(root)
                if name.startswith(f'.prepared.tmp-{_DEAD_PID}-')]
    self.assertLen(leftover, 1)
    self.assertNotEmpty([name for name in os.listdir(
        os.path.join(root, leftover[0])) if records.is_temporary(name)])

    # Killed between the two renames that swap a finished set in: the old
    # set is in a hidden `.old` directory and out_dir is missing.
    rename = tf.io.gfile.rename
    def rename_then_die(source, target, overwrite=False):
      if target == out_dir and '.tmp-' in source:
        raise _Killed()
      return rename(source, target, overwrite)
    with _killed_run(), mock.patch.object(tf.io.gfile, 'rename',
                                          rename_then_die):
      _run_cli(_flags(npz, out_dir, '--overwrite', '--seed=2'))
    self.assertFalse(os.path.exists(out_dir))

    # The next run puts the earlier set back first: without --overwrite it
    # is then refused as any existing set is, and the set is as it was.
    status, stderr = _run_cli(_flags(npz, out_dir, '--seed=3'))
    self.assertEqual(status, 2)
    self.assertIn('pass --overwrite', stderr)
    self.assertEqual(file_hashes(out_dir), prepared)
    # With --overwrite it removes what the killed runs left, and only that.
    self.assertEqual(_run_cli(_flags(npz, out_dir, '--overwrite',
                                     '--seed=3'))[0], 0)
    self.assertEqual(records.read_manifest(out_dir)['seed'], 3)
    self.assertCountEqual(os.listdir(root), kept + ['arrays.npz', 'prepared'])
    for name in kept:
      self.assertEqual(file_hashes(os.path.join(root, name)),
                       file_hashes(os.path.join(root, kept[0])))


if __name__ == '__main__':
  tf.test.main()
