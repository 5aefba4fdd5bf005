"""Paths and clusters that cannot work: one message before anything is written.

A path with a scheme TensorFlow lacks (foo://, s3:// without
tensorflow-io) or a bucket without network fails at its first file call;
a malformed TF_CONFIG fails inside TensorFlow's resolver. Each must be one
message naming the flag or variable and the likely fix (docs/reliability.md,
bad input), raised before a model_dir or data_dir is created.
"""

import dataclasses
import json
import os
import re
from unittest import mock

import tensorflow as tf

import experiment as experiment_command
import prepare as prepare_command
from flags import definitions
from mpl_tf import app
from mpl_tf import distribute
from mpl_tf import storage
from mpl_tf import train
from mpl_tf.config import ConfigError, RunConfig
from tests.test_train import _config, _tempdir
from tests.testing import run_cli_in_process

# What tf.io.gfile.exists raised for a gs:// path on a machine without
# network (TensorFlow 2.20): the error check_reachable translates.
_NO_NETWORK = tf.errors.FailedPreconditionError(
    None, None, "Error executing an HTTP request: libcurl code 6 meaning "
    "'Could not resolve hostname', error details: Could not resolve host: "
    "www.googleapis.com\n\t when reading metadata of gs://bucket/run")


class UnreachablePathTest(tf.test.TestCase):

  def test_unknown_scheme_names_the_flag_and_the_schemes_that_work(self):
    with self.assertRaisesRegex(
        ConfigError, r'--data_dir=foo://x/y: TensorFlow has no file system '
        r'for foo://\. It reads a local path, gs://.*ram://'):
      storage.check_reachable('foo://x/y', 'data_dir')
    storage.check_reachable('ram://fine', 'model_dir')   # no error
    storage.check_reachable('relative/local', 'model_dir')

  def test_a_bucket_without_network_names_the_flag_and_the_credentials(self):
    with mock.patch.object(tf.io.gfile, 'exists', side_effect=_NO_NETWORK):
      with self.assertRaises(ConfigError) as raised:
        storage.check_reachable('gs://bucket/run', 'model_dir')
    message = str(raised.exception)
    self.assertStartsWith(message, '--model_dir=gs://bucket/run cannot be '
                                   'reached (Error executing')
    self.assertIn('Could not resolve host', message)
    self.assertIn('gcloud auth application-default login', message)
    self.assertNotIn('\n', message)

  def test_every_mode_checks_its_paths_before_writing(self):
    data_dir, model_dir = _tempdir(self), _tempdir(self)
    os.rmdir(data_dir)
    os.rmdir(model_dir)
    config = _config(model_dir, data_dir)
    cases = [
        # (what to change, the flag the message must name)
        ({'data': {'data_dir': 'foo://x'}}, '--data_dir=foo://x'),
        ({'run': {'export_dir': 's3://b/e'}}, '--export_dir=s3://b/e'),
        ({'run': {'mode': 'eval', 'checkpoint': 'foo://c'}},
         '--checkpoint=foo://c'),
        ({'run': {'mode': 'predict', 'checkpoint': os.path.join(
            model_dir, 'export'), 'predict_files': 'a.png,hdfs://h/*.png'}},
         '--predict_files=hdfs://h/*.png'),
    ]
    for change, flag in cases:
      changed = dataclasses.replace(config, **{
          group: dataclasses.replace(getattr(config, group), **fields)
          for group, fields in change.items()})
      with self.subTest(flag=flag):
        run = train.run if changed.run.mode == 'train' else app.run
        with self.assertRaisesRegex(ConfigError, f'^{re.escape(flag)}[: ]'):
          run(changed)
        # Nothing was prepared or created (the digits set would be).
        self.assertFalse(os.path.exists(data_dir))
        self.assertFalse(os.path.exists(model_dir))


class CommandPathTest(tf.test.TestCase):
  """The commands' own path checks: ram:// (gone with the process) and
  unreachable paths, refused by main.py, prepare.py and experiment.py
  before any work; the library keeps accepting ram://."""

  def test_main_py_refuses_ram_for_every_path_flag(self):
    config = _config('runs/x', 'data/x')
    definitions.check_paths_outlive_the_command(config)   # local: fine
    for group, field in (('run', 'model_dir'), ('data', 'data_dir'),
                         ('run', 'export_dir'), ('run', 'checkpoint'),
                         ('run', 'predict_files')):
      with self.subTest(field=field):
        value = ('a.png,ram://x/b.png' if field == 'predict_files' else
                 'ram://x')
        changed = dataclasses.replace(config, **{group: dataclasses.replace(
            getattr(config, group), **{field: value})})
        with self.assertRaisesRegex(
            ConfigError, f'^--{field}=ram://x.* is on ram://.*gone when it '
            f'ends.*Pass a local directory or a bucket'):
          definitions.check_paths_outlive_the_command(changed)

  def _run_cli(self, module, argv):
    status, stderr = run_cli_in_process(module.run_cli, argv)
    lines = stderr.splitlines()
    self.assertEqual(status, 2, stderr)
    self.assertLen([l for l in lines if l.startswith('error:')], 1, lines)
    self.assertNotIn('Traceback', stderr)
    return lines[0]

  def test_prepare_and_experiment_name_unreachable_paths(self):
    out_dir = os.path.join(_tempdir(self), 'set')
    line = self._run_cli(prepare_command, [
        'prepare.py', '--source=folder', '--train_dir=foo://photos',
        '--split_rule=custom', '--labeled_per_class=2', f'--out_dir={out_dir}'])
    self.assertStartsWith(line, 'error: --train_dir=foo://photos: TensorFlow '
                                'has no file system for foo://')
    self.assertFalse(os.path.exists(out_dir))
    # (report: were the check gone, it fails at once; two_moon would train)
    line = self._run_cli(experiment_command, [
        'experiment.py', 'report', '--output_dir=ram://results'])
    self.assertStartsWith(line, 'error: --output_dir=ram://results is on '
                                'ram://')
    line = self._run_cli(experiment_command, [
        'experiment.py', 'report', '--output_dir=foo://docs'])
    self.assertStartsWith(line, 'error: --output_dir=foo://docs: TensorFlow '
                                'has no file system')


class TfConfigTest(tf.test.TestCase):

  def test_malformed_tf_config_names_tf_config_and_what_is_wrong(self):
    good = {'cluster': {'worker': ['127.0.0.1:2000', 'host-1.x:2001']},
            'task': {'type': 'worker', 'index': 1}}
    self.assertEqual(distribute.check_tf_config(json.dumps(good)), good)
    cases = {
        '{"cluster": {"worker": ["a:1"]} "task": {}}':
            r'is not valid JSON \(Expecting .,. delimiter',
        '["a:1"]': 'is a JSON list, not an object',
        '{"task": {"type": "worker", "index": 0}}': 'has no "cluster"',
        json.dumps({**good, 'cluster': {'worker': 'a:1,b:2'}}):
            "lists 'a:1,b:2' for job 'worker'.*host:port",
        json.dumps({**good, 'cluster': {'worker': ['a', 'b:2']}}):
            "lists \\['a', 'b:2'\\].*host:port",
        json.dumps({**good, 'task': {'type': 'worker'}}): 'has no "task"',
        json.dumps({**good, 'task': {'type': 'chief', 'index': 0}}):
            "has task type 'chief', which is not a job of its cluster",
        json.dumps({**good, 'task': {'type': 'worker', 'index': 2}}):
            "has task index 2; job 'worker' has 2 worker",
        json.dumps({**good, 'task': {'type': 'worker', 'index': '0'}}):
            "has task index '0'",
    }
    for value, expected in cases.items():
      with self.subTest(value=value):
        with self.assertRaisesRegex(ConfigError, '^TF_CONFIG ' + expected):
          distribute.check_tf_config(value)

  def test_multi_worker_without_tf_config_is_refused(self):
    # Before: one lone replica, no warning; two such processes on one
    # model_dir both wrote as the chief.
    for unset in (None, ''):
      with self.subTest(tf_config=unset):
        with self.assertRaisesRegex(
            ConfigError, r'^--strategy=multi_worker needs TF_CONFIG, which is '
            r'unset: .*--strategy=mirrored'):
          distribute.check_tf_config(unset)
    environment = {k: v for k, v in os.environ.items() if k != 'TF_CONFIG'}
    with mock.patch.dict(os.environ, environment, clear=True):
      with self.assertRaisesRegex(ConfigError, 'needs TF_CONFIG'):
        distribute.get_strategy(RunConfig(strategy='multi_worker'))

  def test_the_strategy_is_refused_before_tensorflow_reads_it(self):
    # What main.py runs first (one `error:` line, as for every ConfigError):
    # TensorFlow's resolver would raise "Expecting ',' delimiter" here.
    bad = '{"cluster": {"worker": ["a:1"]} "task": {}}'
    with mock.patch.dict(os.environ, {'TF_CONFIG': bad}):
      with self.assertRaisesRegex(ConfigError, '^TF_CONFIG is not valid JSON'):
        distribute.get_strategy(RunConfig(strategy='multi_worker'))


if __name__ == '__main__':
  tf.test.main()
