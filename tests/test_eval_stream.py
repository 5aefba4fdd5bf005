"""A simulated pod reading evaluation splits (mpl_tf/data/eval_stream.py).

Host counts 1, 2, 3, 7, 64 and 128, each host an input pipeline of a fake
`tf.distribute.InputContext` with two replicas, against prepared splits of
1, 5 and 126 shards written by the project's writer (records.write_split).
Every record carries its own index as its label, so which host decoded
which record is read off the batches themselves. What a real pod adds
(the strategy handing these pipelines' batches to the chips, the
cross-host reduction) is not simulated here; the two-replica evaluations of
test_distribute.py, test_train.py and test_multi_worker.py run it on CPUs.
"""

import os
import tempfile
from unittest import mock

import keras
import numpy as np
import tensorflow as tf

from mpl_tf import config as config_lib
from mpl_tf import distribute
from mpl_tf import evaluate
from mpl_tf.data import eval_stream
from mpl_tf.data import pipeline
from mpl_tf.data import records

_RECORDS = 200  # Labels 0..199, one per record: the record's identity.
_SHARD_COUNTS = (1, 5, 126)
_HOST_COUNTS = (1, 2, 3, 7, 64, 128)
_REPLICAS_PER_HOST = 2
_PER_REPLICA_BATCH = 4


def _write_split(data_dir: str, num_shards: int):
  """A 1x1-pixel 'validation' split of _RECORDS records and its manifest."""
  rng = np.random.default_rng(num_shards)
  images = rng.integers(0, 256, (_RECORDS, 1, 1, 3), dtype=np.uint8)
  records.write_split(data_dir, 'validation', images, np.arange(_RECORDS),
                      num_shards=num_shards, num_classes=_RECORDS)
  manifest = {'dataset': 'ids', 'num_classes': _RECORDS, 'image_size': 1,
              'channels': 3, 'counts': {'validation': _RECORDS},
              'mean': [0.0] * 3, 'std': [1.0] * 3}
  records.write_manifest(data_dir, manifest)
  return manifest, images


def _records_of(share: eval_stream.Share, shard_sizes):
  """(file, index in file) of every record a share keeps, enumerated."""
  return [(file, index) for file in share.files
          for index in range(shard_sizes[file])
          if index >= share.first and (index - share.first) % share.every == 0]


class SharesTest(tf.test.TestCase):
  """The arithmetic alone, for every host of every simulated pod."""

  def test_every_record_in_exactly_one_share(self):
    for num_shards in _SHARD_COUNTS + (128, 1024):
      sizes = records.shard_sizes(1_281, num_shards)
      every_record = sorted((file, index) for file in range(num_shards)
                            for index in range(sizes[file]))
      for hosts in _HOST_COUNTS:
        with self.subTest(shards=num_shards, hosts=hosts):
          shares = eval_stream.shares(sizes, hosts)
          self.assertLen(shares, hosts)
          kept = [_records_of(share, sizes) for share in shares]
          self.assertEqual([share.real for share in shares],
                           [len(records_) for records_ in kept])
          self.assertEqual(sorted(sum(kept, [])), every_record)
          if num_shards >= hosts:  # By shard: no file read by two hosts.
            files = [file for share in shares for file in share.files]
            self.assertEqual(sorted(files), list(range(num_shards)))
            self.assertTrue(all(share.every == 1 for share in shares))
          else:  # By record: one file per host, every host a file.
            self.assertTrue(all(len(share.files) == 1 for share in shares))


class SimulatedPodTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.temporary = tempfile.TemporaryDirectory()
    cls.sets = {}
    for num_shards in _SHARD_COUNTS:
      data_dir = os.path.join(cls.temporary.name, f'shards{num_shards}')
      cls.sets[num_shards] = (data_dir, *_write_split(data_dir, num_shards))

  @classmethod
  def tearDownClass(cls):
    cls.temporary.cleanup()
    super().tearDownClass()

  def _config(self, data_dir):
    return config_lib.Config(data=config_lib.DataConfig(
        dataset='ids', data_dir=data_dir, image_size=1))

  def _pod_batches(self, data_dir, manifest, hosts):
    """(plans, {host: its batches stacked}), every host's pipeline run in
    one dataset.

    Each host's plan is eval_stream's, for a fake InputContext; its
    pipeline is eval_stream.padded_batches (what pipeline.eval_dataset
    returns) with the plan's values as tensors, so 128 hosts trace once.
    """
    replicas = hosts * _REPLICAS_PER_HOST
    batch_size = replicas * _PER_REPLICA_BATCH
    files = records.split_files(data_dir, 'validation')
    plans = [eval_stream.plan_for_files(
        files, manifest['counts']['validation'], batch_size,
        tf.distribute.InputContext(hosts, host, replicas))
             for host in range(hosts)]
    paths = tf.ragged.constant([list(plan.paths) for plan in plans])
    values = {name: tf.constant([value(plan) for plan in plans], tf.int64)
              for name, value in (('every', lambda p: p.share.every),
                                  ('first', lambda p: p.share.first),
                                  ('real', lambda p: p.share.real),
                                  ('batches', lambda p: p.batches))}

    def host_batches(host):
      plan = eval_stream.EvalPlan(
          paths[host], eval_stream.Share((), values['every'][host],
                                         values['first'][host],
                                         values['real'][host]),
          _PER_REPLICA_BATCH, values['batches'][host], 0)
      batches = eval_stream.padded_batches(self._config(data_dir), manifest,
                                           'validation', plan)
      return batches.map(lambda batch: {'host': host, **batch})

    dataset = tf.data.Dataset.range(hosts).flat_map(host_batches)
    everything = [chunk for chunk in dataset.batch(1024).as_numpy_iterator()]
    everything = {key: np.concatenate([chunk[key] for chunk in everything])
                  for key in everything[0]}
    return plans, {host: {key: value[everything['host'] == host]
                          for key, value in everything.items()}
                   for host in range(hosts)}

  def test_every_record_read_by_one_host_and_counted_once(self):
    for num_shards in _SHARD_COUNTS:
      data_dir, manifest, images = self.sets[num_shards]
      files = records.split_files(data_dir, 'validation')
      self.assertLen(files, num_shards)
      for hosts in _HOST_COUNTS:
        with self.subTest(shards=num_shards, hosts=hosts):
          plans, pod = self._pod_batches(data_dir, manifest, hosts)
          labels = np.concatenate([host['labels'][host['mask'] > 0]
                                   for host in pod.values()])
          # Every record decoded by exactly one host; the masks count them.
          self.assertAllEqual(np.sort(labels), np.arange(_RECORDS))
          self.assertEqual(sum(host['mask'].sum() for host in pod.values()),
                           _RECORDS)
          for host in pod.values():
            self.assertEqual(host['images'].shape[1:],
                             (_PER_REPLICA_BATCH, 1, 1, 3))
            # Each real image is its record's pixel; padding is zero.
            real = host['mask'] > 0
            self.assertAllEqual(host['images'][real][:, 0, 0],
                                images[host['labels'][real], 0, 0])
            self.assertAllEqual(host['images'][~real],
                                np.zeros_like(host['images'][~real]))
          # Every host the same number of batches: the same steps per
          # replica everywhere, one batch per replica of the host a step.
          steps = {plan.steps for plan in plans}
          self.assertLen(steps, 1)
          self.assertEqual({len(host['mask']) for host in pod.values()},
                           {steps.pop() * _REPLICAS_PER_HOST})
          files_read = [path for plan in plans for path in plan.paths]
          if num_shards >= hosts:  # By shard: every file on one host.
            self.assertCountEqual(files_read, files)
          else:  # By record: every host one file, every file read.
            self.assertLen(files_read, hosts)
            self.assertEqual(set(files_read), set(files))

  def test_one_host_pipeline_is_the_simulated_one(self):
    # The pod above runs padded_batches with tensors; pipeline.eval_dataset
    # (what the evaluator reads) runs it with the plan's Python values.
    data_dir, manifest, _ = self.sets[5]
    _, pod = self._pod_batches(data_dir, manifest, 3)
    dataset = pipeline.eval_dataset(self._config(data_dir), manifest,
                                    'validation', 3 * _REPLICAS_PER_HOST *
                                    _PER_REPLICA_BATCH,
                                    tf.distribute.InputContext(3, 2, 6))
    batches = list(dataset.as_numpy_iterator())
    self.assertEqual(dataset.element_spec['images'].shape,
                     [_PER_REPLICA_BATCH, 1, 1, 3])
    for key in ('images', 'labels', 'mask'):
      self.assertAllEqual(pod[2][key], [batch[key] for batch in batches])

  def test_unequal_shares_are_padded_to_the_largest(self):
    # 5 shards of 40 on 2 hosts: 120 and 80 records; host batch 4, so both
    # run ceil(120 / 4) = 30 steps (60 batches of 2 for the host's two
    # replicas), the second with 40 padding examples.
    data_dir, manifest, _ = self.sets[5]
    plans = [eval_stream.plan(data_dir, manifest, 'validation', 8,
                              tf.distribute.InputContext(2, host, 4))
             for host in (0, 1)]
    self.assertEqual([plan.share.real for plan in plans], [120, 80])
    self.assertEqual([plan.steps for plan in plans], [30, 30])
    self.assertEqual([plan.batches for plan in plans], [60, 60])

  def test_endless_input_has_infinite_cardinality(self):
    # What spares MultiWorkerMirroredStrategy's iterator its all-worker
    # "any data left?" vote at every batch (input_lib's
    # _enable_get_next_as_optional is off for infinite datasets).
    data_dir, manifest, _ = self.sets[1]
    config = self._config(data_dir)
    context = tf.distribute.InputContext(2, 1, 2)
    endless, steps = pipeline.eval_input(config, manifest, 'validation', 8,
                                         context, endless=True)
    self.assertEqual(int(endless.cardinality()), tf.data.INFINITE_CARDINALITY)
    finite = list(pipeline.eval_dataset(config, manifest, 'validation', 8,
                                        context).as_numpy_iterator())
    first = list(endless.take(len(finite) + 3).as_numpy_iterator())
    for expected, actual in zip(finite, first):
      self.assertAllEqual(expected['labels'], actual['labels'])
      self.assertAllEqual(expected['mask'], actual['mask'])
    self.assertEqual(len(finite), steps)
    self.assertEqual(sum(b['mask'].sum() for b in first[len(finite):]), 0)

  def test_batch_that_does_not_split_between_replicas_is_refused(self):
    data_dir, manifest, _ = self.sets[5]
    with self.assertRaisesRegex(ValueError, 'multiple of the 4 replicas'):
      eval_stream.plan(data_dir, manifest, 'validation', 6,
                       tf.distribute.InputContext(2, 0, 4))


class CountedReductions:
  """Counts the cross-replica reductions that MirroredStrategy runs.

  On CPUs it reduces through tf.distribute.ReductionToOneDevice (whatever
  its cross_device_ops), whose reduce_implementation is patched to add 1 to
  a variable by an op in the reduction's graph: the count is of executions
  (one per batch, were the reduction in the loop), not of traces.
  """

  def __init__(self):
    with tf.init_scope(), tf.device('/cpu:0'):
      self.runs = tf.Variable(0, dtype=tf.int64, trainable=False)
    original = tf.distribute.ReductionToOneDevice.reduce_implementation

    def counted(ops, *args, **kwargs):
      self.runs.assign_add(1)
      return original(ops, *args, **kwargs)

    self._patch = mock.patch.object(tf.distribute.ReductionToOneDevice,
                                    'reduce_implementation', counted)

  def __enter__(self):
    self._patch.start()
    return self

  def __exit__(self, *unused):
    self._patch.stop()


class EvaluatorTest(tf.test.TestCase):
  """The evaluator on two replicas (conftest.py splits the CPU in two)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.temporary = tempfile.TemporaryDirectory()
    cls.data_dir = os.path.join(cls.temporary.name, 'ids')
    cls.manifest, cls.images = _write_split(cls.data_dir, 5)

  @classmethod
  def tearDownClass(cls):
    cls.temporary.cleanup()
    super().tearDownClass()

  def test_counts_are_exact_and_reduced_once_per_evaluation(self):
    strategy = distribute.get_strategy(config_lib.RunConfig(
        strategy='mirrored'))
    self.assertEqual(strategy.num_replicas_in_sync, 2)
    with strategy.scope():
      model = keras.Sequential([
          keras.Input((1, 1, 3)), keras.layers.Flatten(),
          keras.layers.Dense(_RECORDS, kernel_initializer=keras.initializers
                             .RandomNormal(stddev=0.1, seed=1))])
    # The independent answer: the model on every image, in numpy.
    logits = model(self.images.astype(np.float32)).numpy()
    labels = np.arange(_RECORDS)
    order = np.argsort(-logits, axis=1)
    shifted = logits - logits.max(axis=1, keepdims=True)
    loss = -(shifted[labels, labels] - np.log(np.exp(shifted).sum(axis=1)))
    expected = {'top1': np.mean(order[:, 0] == labels),
                'top5': np.mean((order[:, :5] == labels[:, None]).any(axis=1)),
                'loss': loss.mean(), 'count': _RECORDS, 'nonfinite': 0}
    self.assertGreater(expected['top5'], 0)
    config = config_lib.Config(
        data=config_lib.DataConfig(dataset='ids', data_dir=self.data_dir,
                                   image_size=1),
        run=config_lib.RunConfig(eval_batch_size=16))  # 13 steps of 2 x 8.
    evaluator = evaluate.Evaluator(strategy)
    with CountedReductions() as reductions:
      for evaluations in (1, 2):
        result = evaluate.evaluate_split(evaluator, config, self.manifest,
                                         model, 'validation')
        self.assertAllClose(result, expected, rtol=1e-5, atol=1e-6)
        self.assertEqual(int(reductions.runs.numpy()), evaluations)
    single = evaluate.evaluate_split(evaluate.Evaluator(), config,
                                     self.manifest, model, 'validation')
    self.assertAllClose(single, expected, rtol=1e-5, atol=1e-6)
    # Files that do not hold what the manifest announces (200 records, 199
    # announced) are named, not evaluated into a wrong count.
    wrong = dict(self.manifest, counts={'validation': _RECORDS - 1})
    with self.assertRaisesRegex(ValueError, 'counted 200 images but the '
                                'manifest .* announces 199'):
      evaluate.evaluate_split(evaluate.Evaluator(), config, wrong, model,
                              'validation')


if __name__ == '__main__':
  tf.test.main()
