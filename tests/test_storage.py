"""Every path on a file system that is not the local one, and the markers.

TF's in-memory `ram://` file system stands in for Cloud Storage: it has a
scheme, it cannot rename a directory (see mpl_tf/storage.py), and nothing
written there reaches the disk. The end-to-end tests prepare a folder and
an .npz source, train with a finetuning stage, evaluate, export and predict
with every path on it, from an empty working directory that must stay
empty. The other tests check the completion markers: a prepared set without
its manifest, an export without its metadata and a checkpoint that no state
file names are never taken.
"""

import dataclasses
import io
import os
import tempfile
import uuid
from unittest import mock

import numpy as np
import tensorflow as tf

from mpl_tf import app
from mpl_tf import checkpoints
from mpl_tf import config as config_lib
from mpl_tf import evaluate
from mpl_tf import export_format
from mpl_tf import serving
from mpl_tf import storage
from mpl_tf import train
from mpl_tf.data import offline
from mpl_tf.data import prepare
from mpl_tf.data import record_checks
from mpl_tf.data import records
from mpl_tf.data import tfds_source
from tests.test_train import _config as train_config

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RENAME = tf.io.gfile.rename


def _ram_root(test_case) -> str:
  """A fresh ram:// directory, deleted after the test."""
  root = f'ram://{uuid.uuid4().hex[:8]}'
  tf.io.gfile.makedirs(root)
  test_case.addCleanup(storage.rmtree, root)
  return root


def _write(path, data: bytes) -> str:
  # ram:// lists only directories made with makedirs.
  tf.io.gfile.makedirs(storage.split(path)[0])
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(data)
  return path


def _png(seed, size=8):
  image = np.random.default_rng(seed).integers(0, 256, (size, size, 3),
                                               dtype=np.uint8)
  return tf.io.encode_png(image).numpy()


def _rename_failing_on(name):
  """A tf.io.gfile.rename that fails when moving a file called `name`."""
  def rename(source, target, overwrite=False):
    if storage.split(source)[1] == name:
      raise tf.errors.UnavailableError(None, None, 'connection lost')
    return _RENAME(source, target, overwrite)
  return rename



class WriteJsonTest(tf.test.TestCase):
  """storage.write_json: whole files only, on any file system."""

  def test_a_write_killed_before_its_rename_keeps_the_old_file(self):
    directory = f'ram://write_json_{uuid.uuid4().hex}/run'
    path = f'{directory}/results.json'
    storage.write_json(path, {'b': 2, 'a': 1})
    self.assertEqual(storage.read_json(path), {'a': 1, 'b': 2})
    self.assertEqual(tf.io.gfile.listdir(directory), ['results.json'])
    # Killed after writing the new content, before it is moved into place.
    with mock.patch.object(tf.io.gfile, 'rename',
                           side_effect=KeyboardInterrupt):
      with self.assertRaises(KeyboardInterrupt):
        storage.write_json(path, {'a': 3})
    self.assertEqual(storage.read_json(path), {'a': 1, 'b': 2})

  def test_the_temporary_name_is_the_processs_own(self):
    # So two processes writing one file never share a temporary file, and
    # prepare's overwrite check recognises it ('.tmp-').
    path = f'ram://write_json_{uuid.uuid4().hex}/manifest.json'
    renamed = []
    rename = tf.io.gfile.rename
    def recording_rename(source, target, overwrite=False):
      renamed.append(source)
      rename(source, target, overwrite=overwrite)
    with mock.patch.object(tf.io.gfile, 'rename', recording_rename):
      storage.write_json(path, {'a': 1})
    self.assertEqual(renamed, [f'{path}.tmp-{os.getpid()}'])
    self.assertEqual(storage.read_json(path), {'a': 1})

class HelpersTest(tf.test.TestCase):

  def test_paths_with_a_scheme_are_never_made_absolute(self):
    for path in ('gs://bucket/x', 'ram://x', 's3://b/x/'):
      self.assertTrue(storage.has_scheme(path))
      self.assertEqual(storage.absolute(path), path)
      self.assertFalse(storage.renames_atomically(path))
    self.assertEqual(storage.absolute('~/x'), os.path.expanduser('~/x'))
    self.assertEqual(storage.absolute('x'), os.path.join(os.getcwd(), 'x'))
    self.assertTrue(storage.renames_atomically('/tmp/x'))

  def test_split_and_hidden_sibling_keep_the_scheme(self):
    self.assertEqual(storage.split('ram://x'), ('ram://', 'x'))
    self.assertEqual(storage.split('gs://b/run/export/1/'),
                     ('gs://b/run/export', '1'))
    self.assertEqual(storage.split('data/x'), ('data', 'x'))
    sibling = storage.hidden_sibling('gs://b/run/export/1', 'tmp')
    self.assertStartsWith(sibling, 'gs://b/run/export/.1.tmp-')

  def test_ram_listings_drop_names_that_only_extend_a_sibling(self):
    root = _ram_root(self)
    _write(f'{root}/d/assets.extra/marker.json', b'{}')
    tf.io.gfile.makedirs(f'{root}/d/assets')
    _write(f'{root}/d/variables/variables.index', b'')
    # ram:// itself lists `.extra` in assets/ (from assets.extra).
    self.assertEqual(storage.listdir(f'{root}/d/assets'), [])
    self.assertEqual(storage.list_files(f'{root}/d'),
                     (['assets', 'assets.extra', 'variables'],
                      ['assets.extra/marker.json',
                       'variables/variables.index']))
    storage.rmtree(f'{root}/d')
    self.assertEqual(storage.listdir(root), [])

  def test_tfds_data_dir_keeps_its_scheme(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    with mock.patch.object(tfds, 'builder',
                           side_effect=StopIteration) as builder:
      with self.assertRaises(StopIteration):
        tfds_source.open_tfds('cifar10', 'gs://bucket/tensorflow_datasets')
    self.assertEqual(builder.call_args.kwargs['data_dir'],
                     'gs://bucket/tensorflow_datasets')


class ReplaceDirectoryTest(tf.test.TestCase):

  def _directory(self, root, name, files):
    for relative, content in files.items():
      _write(f'{root}/{name}/{relative}', content)
    return f'{root}/{name}'

  def test_remote_replace_removes_the_old_marker_first_moves_it_last(self):
    root = _ram_root(self)
    final = self._directory(root, 'set', {'a': b'old', 'sub/b': b'old',
                                          'marker': b'old'})
    new = self._directory(root, '.set.tmp', {'a': b'new', 'sub/b': b'new',
                                             'c': b'new', 'marker': b'new'})
    calls = []

    def record(name, function):
      def recorded(path, *args, **kwargs):
        calls.append((name, path, *args))
        return function(path, *args, **kwargs)
      return recorded

    with mock.patch.object(tf.io.gfile, 'rename', record('rename', _RENAME)), \
         mock.patch.object(tf.io.gfile, 'remove',
                           record('remove', tf.io.gfile.remove)):
      storage.replace_directory(new, final, last=('marker',))
    self.assertEqual(calls[0], ('remove', f'{final}/marker'))
    renames = [call for call in calls if call[0] == 'rename']
    self.assertLen(renames, 4)
    self.assertEqual(renames[-1][1:], (f'{new}/marker', f'{final}/marker'))
    _, files = storage.list_files(final)
    self.assertEqual(files, ['a', 'c', 'marker', 'sub/b'])
    self.assertEqual(storage.read_bytes(f'{final}/sub/b'), b'new')
    self.assertFalse(tf.io.gfile.exists(new))

  def test_interrupted_remote_copy_leaves_no_marker(self):
    root = _ram_root(self)
    new = self._directory(root, '.set.tmp', {'a': b'new', 'marker': b'new'})
    with mock.patch.object(tf.io.gfile, 'rename',
                           _rename_failing_on('marker')):
      with self.assertRaises(tf.errors.UnavailableError):
        storage.replace_directory(new, f'{root}/set', last=('marker',))
    self.assertEqual(storage.listdir(f'{root}/set'), ['a'])

  def test_local_replace_renames_whole_directories(self):
    root = self.get_temp_dir()
    final = self._directory(root, 'set', {'a': b'old', 'marker': b'old'})
    new = self._directory(root, '.set.tmp', {'a': b'new', 'marker': b'new'})
    with mock.patch.object(tf.io.gfile, 'rename', wraps=_RENAME) as rename:
      storage.replace_directory(new, final, last=('marker',))
    moved = [call.args for call in rename.call_args_list]
    self.assertLen(moved, 2)   # The old set away, the new one in.
    self.assertEqual(moved[1], (new, final))
    self.assertEqual(sorted(os.listdir(root)), ['set'])
    self.assertEqual(storage.read_bytes(f'{final}/marker'), b'new')


def _tiny_prepared_npz(root, out_dir, **overrides):
  """Prepares 24 random 8x8 images (3 classes) of an .npz on `root`."""
  rng = np.random.default_rng(0)
  buffer = io.BytesIO()
  np.savez(buffer, images=rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8),
           labels=np.arange(24) % 3,
           test_images=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
           test_labels=np.arange(6) % 3)
  path = _write(f'{root}/arrays.npz', buffer.getvalue())
  return prepare.prepare(prepare.PrepareConfig(
      source='npz', npz_path=path, split_rule='custom', labeled_per_class=2,
      validation_per_class=1, out_dir=out_dir, **overrides))


class PreparedMarkerTest(tf.test.TestCase):

  def test_a_directory_of_shards_without_manifest_is_refused(self):
    data_dir = f'{_ram_root(self)}/data'
    for split in records.SPLITS:
      records.write_split(data_dir, split, np.zeros([2, 4, 4, 3], np.uint8),
                          np.arange(2))
    with self.assertRaisesRegex(FileNotFoundError, 'No manifest.json'):
      records.read_manifest(data_dir)
    with self.assertRaisesRegex(FileNotFoundError, 'no manifest.json'):
      offline.ensure_prepared(config_lib.DataConfig(dataset='cifar10_4k',
                                                    data_dir=data_dir))

  def test_replacing_a_remote_set_that_fails_leaves_it_untrusted(self):
    root = _ram_root(self)
    out_dir = f'{root}/prepared'
    _tiny_prepared_npz(root, out_dir)
    self.assertEqual(records.read_manifest(out_dir)['counts']['test'], 6)
    with mock.patch.object(tf.io.gfile, 'rename',
                           _rename_failing_on(records.MANIFEST_NAME)):
      with self.assertRaises(tf.errors.UnavailableError):
        _tiny_prepared_npz(root, out_dir, overwrite=True, seed=1)
    # The new shards are there, the old manifest is gone, the new one never
    # came: nothing trusts the directory, and no temporary is left.
    self.assertNotEmpty(records.split_files(out_dir, 'labeled'))
    with self.assertRaisesRegex(FileNotFoundError, 'No manifest.json'):
      records.read_manifest(out_dir)
    self.assertEqual(sorted(storage.listdir(root)),
                     ['arrays.npz', 'prepared'])
    self.assertEqual(_tiny_prepared_npz(root, out_dir, overwrite=True,
                                        seed=1)['seed'], 1)


class ExportMarkerTest(tf.test.TestCase):

  def test_a_saved_model_without_the_marker_is_refused(self):
    export_dir = f'{_ram_root(self)}/export/1'
    module = tf.Module()
    module.serve = tf.function(lambda x: {'logits': x}, input_signature=[
        tf.TensorSpec([None, 2], tf.float32)])
    tf.saved_model.save(module, export_dir)
    self.assertFalse(export_format.is_export(export_dir))
    message = ('no assets.extra/mpl_tf_export.json, which an mpl_tf export '
               'writes last')
    with self.assertRaisesRegex(FileNotFoundError, message):
      serving.load_serving(export_dir)
    with self.assertRaisesRegex(FileNotFoundError, message):
      evaluate.evaluate(config_lib.Config(), {'num_classes': 2}, export_dir,
                        'test')
    _write(f'{export_dir}/{export_format.METADATA_PATH}', b'{}')
    self.assertTrue(export_format.is_export(export_dir))


class CheckpointMarkerTest(tf.test.TestCase):

  def test_only_what_the_state_file_names_is_taken(self):
    directory = f'{_ram_root(self)}/checkpoints'
    checkpoint = tf.train.Checkpoint(v=tf.Variable(1.0))
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=2)
    named = manager.save(checkpoint_number=1)
    # A newer checkpoint that no state file names, as a cut-short save
    # leaves: not taken from the directory, but usable by its prefix.
    stray = checkpoint.write(f'{directory}/ckpt-2')
    self.assertEqual(checkpoints.resolve_checkpoint(directory), named)
    self.assertEqual(checkpoints.resolve_checkpoint(stray), stray)
    self.assertEqual(checkpoints.resolve_checkpoint(stray + '.index'), stray)
    tf.io.gfile.remove(f'{directory}/checkpoint')
    with self.assertRaisesRegex(FileNotFoundError,
                                'ckpt-2 without a `checkpoint` state file'):
      checkpoints.resolve_checkpoint(directory)


def _write_folder_source(root):
  """root/{train,test}/<class>/ PNGs, with a nested folder and a hidden file."""
  for split, count in (('train', 6), ('test', 2)):
    for label, name in enumerate(('cat', 'dog')):
      for i in range(count):
        nested = 'more/' if i == 0 else ''
        _write(f'{root}/{split}/{name}/{nested}{i}.png', _png(label * 10 + i))
  _write(f'{root}/train/cat/.hidden.png', b'not an image')


class RemoteEndToEndTest(tf.test.TestCase):
  """Every path on ram://, from an empty working directory that stays so."""

  def setUp(self):
    super().setUp()
    self.root = _ram_root(self)
    working_dir = tempfile.mkdtemp()
    self.addCleanup(os.rmdir, working_dir)
    self.addCleanup(os.chdir, os.getcwd())
    os.chdir(working_dir)
    self.addCleanup(self._assert_nothing_local, working_dir)

  def _assert_nothing_local(self, working_dir):
    self.assertEqual(os.listdir(working_dir), [])
    self.assertEqual([name for name in os.listdir(_REPO)
                      if name.startswith('ram:')], [])

  def test_prepare_folder_and_npz_sources(self):
    _write_folder_source(f'{self.root}/photos')
    out_dir = f'{self.root}/prepared/photos'
    manifest = prepare.prepare(prepare.PrepareConfig(
        source='folder', train_dir=f'{self.root}/photos/train',
        test_dir=f'{self.root}/photos/test', split_rule='custom',
        labeled_per_class=2, validation_per_class=1, out_dir=out_dir))
    self.assertEqual(manifest['counts'], {'labeled': 4, 'unlabeled': 6,
                                          'validation': 2, 'test': 4})
    self.assertEqual(manifest['class_names'], ['cat', 'dog'])
    self.assertEqual(manifest['source_details']['train_dir'],
                     f'{self.root}/photos/train')
    self.assertEqual(record_checks.check_dataset(out_dir)['test'], 4)

    npz_manifest = _tiny_prepared_npz(self.root, f'{self.root}/prepared/npz')
    self.assertEqual(npz_manifest['source_details'],
                     {'path': f'{self.root}/arrays.npz'})
    self.assertEqual(npz_manifest['image_size'], 8)
    self.assertEqual(sorted(storage.listdir(f'{self.root}/prepared')),
                     ['npz', 'photos'])

  def test_train_finetune_eval_export_predict(self):
    config = train_config(f'{self.root}/run', f'{self.root}/data',
                          '--finetune_steps=2', '--num_steps=2',
                          '--eval_every=0', '--nosupervised_baseline')
    results = train.run(config)
    self.assertEqual(results['mpl_ema_student_finetuned']['test']['count'],
                     100)
    self.assertIsNotNone(records.read_manifest(f'{self.root}/data'))

    def run(mode, **changes):
      return app.run(dataclasses.replace(config, run=dataclasses.replace(
          config.run, mode=mode, **changes)))

    exported = run('export')
    self.assertEqual(exported['export_dir'], f'{self.root}/run/export/1')
    self.assertIn('/finetune/checkpoints/', exported['checkpoint'])
    evaluated = run('eval', checkpoint=exported['export_dir'])
    self.assertAllClose(evaluated['test']['top1'],
                        results['mpl_ema_student_finetuned']['test']['top1'])
    image = _write(f'{self.root}/digit.png', _png(0, size=32))
    predicted = run('predict', predict_files=image)
    self.assertEqual(predicted['predictions'][0]['file'], image)

    # An export that stopped before its marker is refused, then replaced.
    with mock.patch.object(tf.io.gfile, 'rename',
                           _rename_failing_on(export_format.METADATA_NAME)):
      with self.assertRaises(tf.errors.UnavailableError):
        run('export')
    with self.assertRaisesRegex(FileNotFoundError, 'no assets.extra'):
      run('predict', predict_files=image)
    with self.assertRaisesRegex(FileNotFoundError, 'no assets.extra'):
      run('eval', checkpoint=exported['export_dir'])
    run('export')
    self.assertLen(run('predict', predict_files=image)['predictions'], 1)


if __name__ == '__main__':
  tf.test.main()
