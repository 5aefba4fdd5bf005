"""The examples run as a user runs them: in a fresh process, at tiny size."""

import os
import re
import subprocess
import sys
import tempfile

import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each run takes 15-25 s on two cores (imports, data preparation, tracing).
_TIMEOUT_SECONDS = 300


class KerasFitExampleTest(tf.test.TestCase):

  def test_both_pipelines_fit_evaluate_and_save(self):
    with tempfile.TemporaryDirectory() as directory:
      data_dir = os.path.join(directory, 'data')
      for pipeline in ('library', 'plain'):
        out_dir = os.path.join(directory, pipeline)
        run = subprocess.run(
            [sys.executable, os.path.join(REPO, 'examples', 'keras_fit.py'),
             '--steps=4', '--epochs=2', f'--pipeline={pipeline}',
             f'--data_dir={data_dir}', f'--out_dir={out_dir}'],
            cwd=REPO, capture_output=True, text=True,
            timeout=_TIMEOUT_SECONDS, check=False)
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        self.assertRegex(run.stdout, f'{pipeline} pipeline, 4 steps: EMA '
                         r'student test accuracy \d\.\d{3}')
        saved = re.search(r'saved the EMA student to (\S+) .*agree with '
                          r"the model's: 100%", run.stdout)
        self.assertIsNotNone(saved, run.stdout)
        self.assertTrue(os.path.exists(saved.group(1)))
        # BackupAndRestore removes its backup once fit() has finished.
        self.assertFalse(os.path.exists(os.path.join(out_dir, 'backup')))
