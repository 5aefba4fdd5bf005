"""Which records an input pipeline reads, and in which order, parsed.

A split's shard files are dealt to the input pipelines; each pipeline reads
its files once in file order (evaluation) or as an endless stream that is
reshuffled every epoch by a seed (training) and can start at any record, so
a resumed run continues with the data it would have seen. Records leave as
(uint8 image, int32 label) pairs with their labels checked. Kept apart from
`pipeline.py`, which turns these pairs into the batches and views that the
steps take.
"""

from typing import Any, Dict, List, Tuple

import tensorflow as tf

from mpl_tf import config as config_lib
from mpl_tf.data import augment
from mpl_tf.data import records

AUTOTUNE = tf.data.AUTOTUNE
# Splits up to this many records are shuffled whole (the buffer holds encoded
# bytes, about 1 kB for a 32x32 PNG); larger ones use 16 batches, as released.
_WHOLE_SPLIT_SHUFFLE_LIMIT = 100_000
_SHUFFLE_BATCHES = 16
_FOREVER = 2**62  # Epochs of an endless stream.


def split_count(manifest: Dict[str, Any], split: str) -> int:
  """The manifest's record count of a split; ValueError if it has none."""
  count = manifest.get('counts', {}).get(split)
  if count is None:
    raise ValueError(f'The manifest has no count for split {split!r}; '
                     f'prepare the data set again.')
  return int(count)


def shuffle_buffer_size(num_records: int, batch_size: int) -> int:
  """The whole split when it is small, else min(num_records, 16 batches)."""
  if num_records <= _WHOLE_SPLIT_SHUFFLE_LIMIT:
    return max(num_records, 1)
  return min(num_records, _SHUFFLE_BATCHES * batch_size)


def _pipeline_files(config: config_lib.Config, split: str, input_context
                    ) -> Tuple[List[str], List[int]]:
  """This input pipeline's shard files of a split, and their positions."""
  data_dir = config.data.data_dir
  files = records.split_files(data_dir, split)
  pipelines = 1 if input_context is None else input_context.num_input_pipelines
  if pipelines == 1:
    return files, list(range(len(files)))
  if len(files) < pipelines:
    raise ValueError(
        f'Split {split!r} in {data_dir!r} has {len(files)} files for '
        f'{pipelines} input pipelines; prepare it with at least that many '
        f'shards (--shard_size).')
  positions = list(range(input_context.input_pipeline_id, len(files),
                         pipelines))
  return [files[i] for i in positions], positions


def _read(file_names: tf.data.Dataset, num_files: int) -> tf.data.Dataset:
  """Serialized records of the files, in a deterministic order."""
  if num_files == 1:
    return file_names.flat_map(tf.data.TFRecordDataset)
  return file_names.interleave(
      tf.data.TFRecordDataset, cycle_length=min(num_files, 16),
      num_parallel_calls=AUTOTUNE, deterministic=True)


def _stateless_permutation(values: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """`values` in an order that is a pure function of `seed` ([2] int64)."""
  keys = tf.random.stateless_uniform([tf.shape(values)[0]], seed)
  return tf.gather(values, tf.argsort(keys))


def _endless_records(files: List[str], num_records: int, buffer_size: int,
                     seed: int, start_record: int) -> tf.data.Dataset:
  """Records epoch after epoch, each epoch shuffled by its own seed.

  Epoch e holds exactly the split's records: the files in a random order,
  then the records in chunks of `buffer_size` (the whole split, when it is
  small), each chunk randomly permuted, every draw seeded by (seed, e) alone.
  So the stream from record r on is the same whether it starts at 0 or at r,
  which is how a resumed run continues with the data it would have seen: it
  starts at epoch r // N and skips r % N serialized records (read, not
  decoded). tf.data's own shuffle cannot do this: its seed must be a Python
  value, not a function of the epoch.
  """
  first_epoch, skip = divmod(start_record, num_records)
  base_seed = tf.constant([seed, 0], tf.int64)

  def one_epoch(epoch):
    file_seed, chunk_seed = tf.unstack(
        augment.split_seed(augment.fold_seed(base_seed, epoch), 2))
    names = tf.data.Dataset.from_tensor_slices(
        _stateless_permutation(tf.constant(files), file_seed))
    chunks = _read(names, len(files)).batch(buffer_size).enumerate()
    return chunks.map(lambda index, chunk: _stateless_permutation(
        chunk, augment.fold_seed(chunk_seed, index))).unbatch()

  epochs = tf.data.Dataset.range(first_epoch, _FOREVER)
  return epochs.flat_map(one_epoch).skip(skip)


def parsed_split(config: config_lib.Config, manifest: Dict[str, Any],
                 split: str, input_context=None, shuffle_batch_size: int = 0,
                 seed: int = 0, start_record: int = 0,
                 record_shard: Tuple[int, int] = (1, 0)) -> tf.data.Dataset:
  """(uint8 image, int32 label) pairs: one pass in file order, or (with
  `shuffle_batch_size`) an endless shuffled stream from record `start_record`
  of this input pipeline on. `record_shard` = (n, i) keeps every n-th record
  from the i-th on, before any is decoded.

  Labels outside [0, num_classes) stop the stream with an error naming the
  split; the training loop then names the file
  (record_checks.check_split).
  """
  data_dir = config.data.data_dir
  files, positions = _pipeline_files(config, split, input_context)
  if shuffle_batch_size:
    count = split_count(manifest, split)
    if count == 0:
      raise ValueError(f'Split {split!r} in {data_dir!r} is empty; a '
                       f'training stream needs at least one image.')
    sizes = records.shard_sizes(count, len(records.split_files(data_dir,
                                                               split)))
    pipeline_count = sum(sizes[i] for i in positions)
    dataset = _endless_records(
        files, pipeline_count,
        shuffle_buffer_size(pipeline_count, shuffle_batch_size), seed,
        start_record)
  else:
    dataset = _read(tf.data.Dataset.from_tensor_slices(files), len(files))
  if record_shard[0] > 1:
    dataset = dataset.shard(*record_shard)
  image_size = manifest.get('image_size')
  num_classes = int(manifest['num_classes'])
  message = (f'a label outside [0, {num_classes}) in split {split!r} of '
             f'{data_dir!r}')

  def parse(serialized):
    image, label = records.parse_example(serialized, image_size, 3)
    checks = [tf.debugging.assert_non_negative(label, message=message),
              tf.debugging.assert_less(label, num_classes, message=message)]
    with tf.control_dependencies(checks):
      return image, tf.identity(label)

  return dataset.map(parse, num_parallel_calls=AUTOTUNE)
