"""Training input at pod scale, simulated: shares, resume, stale shards.

Three small sets are prepared with the project's writer
(dataset_writer.write_prepared, as prepare.py and the offline sets do), with
1, 5 and 126 shards of 377 records whose labels are their record ids, so a
record's label names it. Hosts are simulated by calling the pipeline with
a tf.distribute.InputContext(num_input_pipelines, input_pipeline_id): no
cluster. What each host reads is checked against the records each shard
file holds (read once here, independently of the code under test).
"""

import contextlib
import io
import os
import shutil
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf

from mpl_tf import config as config_lib
from mpl_tf.data import array_source
from mpl_tf.data import dataset_writer
from mpl_tf.data import input_shares
from mpl_tf.data import pipeline
from mpl_tf.data import record_checks
from mpl_tf.data import record_stream
from mpl_tf.data import records
from mpl_tf.data import shard_list

_RECORDS = 377
# Shard size -> shard count of the 377 records: one shard, 5, 126.
_SETS = {None: 1, 76: 5, 3: 126}
_HOSTS = (1, 2, 3, 5, 7, 63, 64, 126, 128, 256)


def _prepare(out_dir, shard_size):
  images = np.zeros([_RECORDS, 2, 2, 3], np.uint8)
  images[:, 0, 0, :] = (np.arange(_RECORDS)[:, None] * [1, 3, 7]) % 256
  source = array_source.from_arrays('ids', images, np.arange(_RECORDS))
  everything = np.arange(_RECORDS)
  plan = {'labeled': (source.train, everything[:70]),
          'unlabeled': (source.train, everything),
          'validation': (source.train, everything[:3]),
          'test': (source.train, everything[:3])}
  return dataset_writer.write_prepared(
      out_dir, source, plan, dataset='ids', split_rule='custom', seed=0,
      params={}, shard_size=shard_size)


def _label(serialized):
  """The record's label, its id here (read without the code under test)."""
  return tf.train.Example.FromString(serialized).features.feature[
      records.LABEL_KEY].int64_list.value[0]


def _labels_of_file(path):
  return [_label(serialized)
          for serialized in tf.compat.v1.io.tf_record_iterator(path)]


def _context(hosts, host):
  return tf.distribute.InputContext(num_input_pipelines=hosts,
                                    input_pipeline_id=host,
                                    num_replicas_in_sync=hosts)


def _take_labels(dataset, count):
  return [int(label) for _, label in dataset.take(count)]


class PodSimulationTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.temporary = tempfile.mkdtemp()
    cls.sets = {}   # shard count -> (data_dir, manifest)
    cls.file_labels = {}   # shard path -> the labels it holds, in order
    for shard_size, count in _SETS.items():
      data_dir = os.path.join(cls.temporary, f'ids_{count}')
      manifest = _prepare(data_dir, shard_size)
      cls.sets[count] = (data_dir, manifest)
      for name in tf.io.gfile.listdir(data_dir):
        if name.startswith('unlabeled-'):
          path = os.path.join(data_dir, name)
          cls.file_labels[path] = _labels_of_file(path)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.temporary, ignore_errors=True)
    super().tearDownClass()

  def _config(self, data_dir):
    return config_lib.Config(data=config_lib.DataConfig(
        dataset='ids', data_dir=data_dir, image_size=2))

  def _shards(self, count, manifest=None):
    data_dir, written = self.sets[count]
    return records.split_shards(data_dir, 'unlabeled', manifest or written)

  def _share(self, pieces):
    """The record ids of a share, from the files' own contents."""
    return [label for piece in pieces for label in
            self.file_labels[piece.path][piece.skip:piece.skip + piece.take]]

  def test_manifest_lists_each_shard_and_older_manifests_give_the_same(self):
    for count, (data_dir, manifest) in self.sets.items():
      with self.subTest(shards=count):
        listed = manifest['shards']['unlabeled']
        self.assertLen(listed, count)
        on_disk = sorted(name for name in tf.io.gfile.listdir(data_dir)
                         if name.startswith('unlabeled-'))
        self.assertEqual([entry['file'] for entry in listed], on_disk)
        self.assertEqual(
            [entry['records'] for entry in listed],
            [len(self.file_labels[os.path.join(data_dir, name)])
             for name in on_disk])
        # A manifest from before the list (it has shard_size), and one
        # written by hand (neither): the same shards and counts.
        older = {k: v for k, v in manifest.items() if k != 'shards'}
        by_hand = {k: v for k, v in older.items() if k != 'shard_size'}
        self.assertEqual(self._shards(count, older), self._shards(count))
        self.assertEqual(self._shards(count, by_hand), self._shards(count))

  def test_every_record_once_per_epoch_by_one_host_with_balanced_shares(self):
    for count in self.sets:
      shards = self._shards(count)
      largest_shard = max(shard.records for shard in shards)
      for hosts in _HOSTS:
        with self.subTest(shards=count, hosts=hosts):
          shares = [self._share(input_shares.pipeline_pieces(
              'unlabeled', shards, hosts, host)) for host in range(hosts)]
          everything = sorted(label for share in shares for label in share)
          self.assertEqual(everything, list(range(_RECORDS)))
          sizes = [len(share) for share in shares]
          self.assertEqual(sizes, input_shares.share_sizes(
              'unlabeled', shards, hosts))
          # Within one record (ranges), one record per shard (whole
          # shards, which the writer cuts nearly equal): always within
          # one shard's worth.
          whole = hosts == 1 or count % hosts == 0
          self.assertLessEqual(max(sizes) - min(sizes),
                               count // hosts if whole else 1)
          self.assertLessEqual(max(sizes) - min(sizes), largest_shard)
          self.assertEqual(input_shares.scheme(shards, hosts),
                           input_shares.WHOLE_SHARDS if whole else
                           input_shares.RECORD_RANGES)

  def test_more_hosts_than_records_is_refused_naming_global_batch(self):
    with self.assertRaisesRegex(ValueError, '377 records for 378 input '
                                'pipelines.*--input_sharding=global_batch'):
      input_shares.pipeline_pieces('unlabeled', self._shards(126), 378, 0)

  def test_hosts_streams_read_the_split_once_per_epoch_and_reshuffle(self):
    # 5 shards on 7 hosts: dealt whole, as before, they were refused (and
    # on 3 hosts dealt 2/2/1: one host seeing its images twice as often).
    data_dir, manifest = self.sets[5]
    hosts = 7
    shares = input_shares.share_sizes('unlabeled', self._shards(5), hosts)
    first_epochs, second_epochs = [], []
    for host in range(hosts):
      with contextlib.redirect_stdout(io.StringIO()):
        stream = record_stream.parsed_split(
            self._config(data_dir), manifest, 'unlabeled',
            _context(hosts, host), shuffle_batch_size=4, seed=5)
      labels = _take_labels(stream, 2 * shares[host])
      first, second = labels[:shares[host]], labels[shares[host]:]
      self.assertCountEqual(first, second)       # the same share ...
      self.assertNotEqual(first, second)         # ... in a new order
      first_epochs += first
      second_epochs += second
    self.assertEqual(sorted(first_epochs), list(range(_RECORDS)))
    self.assertEqual(sorted(second_epochs), list(range(_RECORDS)))

  def test_only_the_first_host_prints_the_choice_and_lists_the_folder(self):
    # One client builds every host's pipeline on a TPU pod slice: one
    # listing of the folder, not one per host.
    data_dir, manifest = self.sets[126]
    printed, listings = [], []
    for host in (0, 1):
      output = io.StringIO()
      with contextlib.redirect_stdout(output), mock.patch.object(
          shard_list, '_on_disk', wraps=shard_list._on_disk) as listing:
        record_stream.parsed_split(self._config(data_dir), manifest,
                                   'unlabeled', _context(128, host), 4)
      printed.append(output.getvalue())
      listings.append(listing.call_count)
    self.assertIn("split 'unlabeled', 377 records in 126 shard(s), over 128 "
                  'input pipelines: record ranges, 2 to 3 records per '
                  'pipeline (whole shards would deal 0 to 1', printed[0])
    self.assertEqual(printed[1], '')
    self.assertEqual(listings, [1, 0])

  def test_resumed_streams_equal_the_straight_stream(self):
    # Shuffle chunks of 32 records, so that a share of the 126 shards is
    # read in several groups of shards (and a resumed stream must place its
    # start by the shards' counts), or, on many hosts, in one group.
    shards = self._shards(126)
    for hosts, host in [(1, 0), (2, 1), (7, 3), (256, 255)]:
      pieces = input_shares.pipeline_pieces('unlabeled', shards, hosts, host)
      share = sum(piece.take for piece in pieces)
      # Mid-epoch, across an epoch's end, at one, in the next and (small
      # shares) a later epoch.
      starts = sorted({33, share - 1, share, share + 7} |
                      ({3 * share + 5} if share < 100 else set()))
      length = min(share, 40) + 2

      def stream(start, count, pieces=pieces):
        return [_label(record.numpy()) for record in record_stream
                ._endless_records(pieces, 32, 9, start).take(count)]

      straight = stream(0, max(starts[-1] + length, 2 * share))
      self.assertCountEqual(straight[:share], straight[share:2 * share])
      if share > 10:   # A new order in the next epoch.
        self.assertNotEqual(straight[:share], straight[share:2 * share])
      for start in starts:
        with self.subTest(hosts=hosts, host=host, start=start):
          self.assertEqual(stream(start, length),
                           straight[start:start + length])

  def test_a_resumed_stream_opens_no_shard_before_its_group(self):
    # One host, 126 shards of 3 records, chunks of 32: a group of shards
    # holds at most 30 records, a contiguous run of the stream. Resuming at
    # record 677 (epoch 1, late) may read only the shards of the records
    # around it; the others are deleted from a copy of the set, and the
    # resumed stream must not notice (before, it read the epoch from its
    # first record and failed on the first missing shard).
    data_dir = os.path.join(self.get_temp_dir(), 'sparse')
    shutil.copytree(self.sets[126][0], data_dir)
    shards = records.split_shards(data_dir, 'unlabeled',
                                  self.sets[126][1])
    pieces = [input_shares.Piece(shard.path, 0, shard.records)
              for shard in shards]
    start, length = 677, 20

    def stream(begin, count):
      return [_label(record.numpy()) for record in record_stream
              ._endless_records(pieces, 32, 9, begin).take(count)]

    straight = stream(0, start + length + 32)
    needed = set(straight[start - 32:start + length + 32])
    removed = 0
    for shard in shards:
      if not needed & set(self.file_labels[shard.path.replace(
          data_dir, self.sets[126][0])]):
        os.remove(shard.path)
        removed += 1
    self.assertGreater(removed, 80)   # of 126
    self.assertEqual(stream(start, length), straight[start:start + length])

  def test_resumed_batches_equal_the_straight_batches(self):
    data_dir, manifest = self.sets[5]
    config = self._config(data_dir)
    context = _context(7, 2)
    with contextlib.redirect_stdout(io.StringIO()):
      straight = list(pipeline.labeled_dataset(
          config, manifest, 35, context).take(25))
      resumed = list(pipeline.labeled_dataset(
          config, manifest, 35, context, start_step=17).take(8))
    for step, batch in enumerate(resumed, start=17):
      self.assertAllEqual(batch['labels'], straight[step]['labels'])
      self.assertAllEqual(batch['labeled_images'],
                          straight[step]['labeled_images'])

  def test_global_batch_hosts_keep_their_rows_of_one_hosts_batches(self):
    data_dir, manifest = self.sets[5]
    config = config_lib.Config(data=config_lib.DataConfig(
        dataset='ids', data_dir=data_dir, image_size=2,
        input_sharding='global_batch'))
    one_host = list(pipeline.labeled_dataset(config, manifest, 36).take(3))
    with contextlib.redirect_stdout(io.StringIO()):
      hosts = [list(pipeline.labeled_dataset(
          config, manifest, 36, _context(3, host)).take(3))
               for host in range(3)]
    for step, batch in enumerate(one_host):
      for key in ('labels', 'labeled_images'):
        self.assertAllEqual(
            np.concatenate([host[step][key] for host in hosts]), batch[key])

  def test_stale_shards_of_another_count_are_named_and_ignored(self):
    # The 5-shard set staged over a copy of the 126-shard one without
    # deleting (what gsutil rsync without -d did).
    data_dir = os.path.join(self.get_temp_dir(), 'restaged')
    shutil.copytree(self.sets[126][0], data_dir)
    shutil.copytree(self.sets[5][0], data_dir, dirs_exist_ok=True)
    manifest = records.read_manifest(data_dir)
    warnings = io.StringIO()
    with contextlib.redirect_stderr(warnings):
      shards = records.split_shards(data_dir, 'unlabeled', manifest)
      again = records.split_shards(data_dir, 'unlabeled', manifest)
    self.assertEqual([os.path.basename(s.path) for s in shards],
                     [records.shard_name('unlabeled', i, 5)
                      for i in range(5)])
    self.assertEqual(shards, again)
    self.assertRegex(warnings.getvalue(),
                     r'holds 126 shard file\(s\) of split .unlabeled. that '
                     r'its manifest.json does not list \(unlabeled-00000-'
                     r'of-00126.tfrecord, .* and 121 more\).*ignored')
    self.assertEqual(warnings.getvalue().count('warning:'), 1)   # once
    # Training on 3 hosts reads each record once an epoch, and the
    # manifest's counts are right: the whole check scans only its shards.
    shares = []
    with contextlib.redirect_stdout(io.StringIO()), \
         contextlib.redirect_stderr(io.StringIO()):
      for host in range(3):
        stream = record_stream.parsed_split(
            self._config(data_dir), manifest, 'unlabeled', _context(3, host),
            shuffle_batch_size=4)
        shares += _take_labels(stream, input_shares.share_sizes(
            'unlabeled', shards, 3)[host])
      self.assertEqual(sorted(shares), list(range(_RECORDS)))
      evaluation = list(pipeline.eval_dataset(self._config(data_dir),
                                              manifest, 'unlabeled', 64))
      self.assertEqual(sum(float(b['mask'].numpy().sum())
                           for b in evaluation), _RECORDS)
      self.assertEqual(record_checks.check_dataset(
          data_dir, manifest, ['unlabeled'])['unlabeled'], _RECORDS)
    # A manifest that lists no shards and has no shard_size (written by
    # hand) cannot tell the two sets apart: refused.
    by_hand = {k: v for k, v in manifest.items()
               if k not in ('shards', 'shard_size')}
    with self.assertRaisesRegex(ValueError, 'shards of 2 preparations '
                                r'\(-of-00005, -of-00126\)'):
      records.split_shards(data_dir, 'unlabeled', by_hand)

  def test_missing_or_wrong_listed_shards_are_named(self):
    data_dir = os.path.join(self.get_temp_dir(), 'incomplete')
    shutil.copytree(self.sets[5][0], data_dir)
    manifest = records.read_manifest(data_dir)
    first = os.path.join(data_dir, records.shard_name('unlabeled', 0, 5))
    third = os.path.join(data_dir, records.shard_name('unlabeled', 2, 5))
    fourth = os.path.join(data_dir, records.shard_name('unlabeled', 3, 5))
    shutil.copy(first, fourth)   # 76 records where 75 are listed
    with self.assertRaisesRegex(
        ValueError, f'{fourth} holds 76 records but manifest.json lists 75'):
      record_checks.check_dataset(data_dir, manifest, ['unlabeled'])
    os.remove(third)
    # Even the sampled scan of a large set (max_records) sees it.
    with self.assertRaisesRegex(FileNotFoundError,
                                'lacks 1 of the 5 shards its manifest.json '
                                'lists \\(unlabeled-00002-of-00005'):
      record_checks.check_dataset(data_dir, manifest, ['unlabeled'],
                                  max_records=10)


if __name__ == '__main__':
  tf.test.main()
