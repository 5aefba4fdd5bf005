"""Checks of prepared records: the first bad record, named with its fix.

The training loop calls `check_dataset` after its input pipeline raised a
tf.errors.OpError, to replace an opaque op-level error with the shard file,
the record index and the fix. This is a job of its own, separate from
writing and parsing records (`records.py`): it runs only after a failure or
on request, re-reads records in Python to say what is wrong with one, and
reads the schema (feature keys, parser, shard names, manifest) from
`records.py`, so the two cannot drift apart.
"""

from typing import Any, Dict, Iterable, Optional

import tensorflow as tf

from mpl_tf.data import records

_REPREPARE = ('prepare the data set again (python prepare.py, '
              'or delete manifest.json of an offline set)')


def _describe_problem(serialized: bytes, num_classes: int,
                      image_size: Optional[int], channels: int
                      ) -> Optional[str]:
  """What is wrong with one serialized record, or None if nothing is."""
  try:
    example = tf.train.Example.FromString(serialized)
  except Exception:  # pylint: disable=broad-except
    return 'is not a tf.train.Example (unparsable bytes)'
  feature = example.features.feature
  if records.IMAGE_KEY not in feature or len(
      feature[records.IMAGE_KEY].bytes_list.value) != 1:
    return f'has no single bytes feature {records.IMAGE_KEY!r}'
  if records.LABEL_KEY not in feature or len(
      feature[records.LABEL_KEY].int64_list.value) != 1:
    return f'has no single int64 feature {records.LABEL_KEY!r}'
  label = feature[records.LABEL_KEY].int64_list.value[0]
  if not 0 <= label < num_classes:
    return (f'has label {label}, outside [0, {num_classes}) (labels are '
            f'0-based; 1-based labels must be shifted down by 1)')
  encoded = feature[records.IMAGE_KEY].bytes_list.value[0]
  try:
    image = records.decode_image(tf.constant(encoded), channels=0)
  except tf.errors.OpError as error:
    return f'has an undecodable image ({error.message.strip()})'
  height, width, stored_channels = image.shape
  if stored_channels != channels:
    return (f'has an image with {stored_channels} channels, expected '
            f'{channels}')
  if image_size is not None and (height, width) != (image_size, image_size):
    return (f'has a {height}x{width} image, expected {image_size}x'
            f'{image_size}')
  return None


def _locate_problem(path: str, num_classes: int, image_size: Optional[int],
                    channels: int, limit: Optional[int]) -> None:
  """Record by record, raises ValueError naming the first bad record."""
  records = iter(tf.data.TFRecordDataset(path))
  index = 0
  while limit is None or index < limit:
    try:
      serialized = next(records)
    except StopIteration:
      return
    except tf.errors.OpError as error:
      raise ValueError(
          f'{path}: record {index} is corrupt ({error.message.strip()}); the '
          f'file is damaged (an interrupted copy or a disk error). Copy it '
          f'again or {_REPREPARE}.') from None
    problem = _describe_problem(serialized.numpy(), num_classes, image_size,
                                channels)
    if problem:
      raise ValueError(f'{path}: record {index} {problem}. Fix the source '
                       f'and {_REPREPARE}.')
    index += 1


def _assert_record(serialized: tf.Tensor, num_classes: int,
                   image_size: Optional[int], channels: int) -> tf.Tensor:
  """Graph-side checks of one record, for the fast parallel scan."""
  encoded, label = records.parse_encoded(serialized)
  shape = tf.shape(records.decode_image(encoded, channels=0))
  checks = [
      tf.debugging.assert_equal(shape[2], channels),
      tf.debugging.assert_greater_equal(label, 0),
      tf.debugging.assert_less(label, num_classes),
  ]
  if image_size is not None:
    checks.append(tf.debugging.assert_equal(shape[:2],
                                            [image_size, image_size]))
  with tf.control_dependencies(checks):
    return tf.constant(1, tf.int64)


def check_split(data_dir: str, split: str, num_classes: int,
                image_size: Optional[int] = None, channels: int = 3,
                max_records: Optional[int] = None,
                manifest: Optional[Dict[str, Any]] = None) -> int:
  """Scans a split's shards; ValueError naming the first bad record.

  A record is bad if the file around it is corrupt (TFRecord checksum or
  length), if it is not a tf.train.Example of this schema, if its image
  cannot be decoded, has other than `channels` channels or (with
  `image_size`) another size, or if its label is outside [0, num_classes).
  Each shard is first scanned by a parallel tf.data pass (fast when all is
  well); only a shard that fails is re-read record by record, to name the
  record. Scanning stops at the first problem.

  Args:
    data_dir: directory of the prepared data set.
    split: split name, e.g. 'unlabeled'.
    num_classes: labels must be in [0, num_classes).
    image_size: if given, every image must be image_size x image_size.
    channels: the channel count images must be stored with.
    max_records: stop after this many records (None: the whole split).
    manifest: the set's manifest (read from data_dir when None): its list
      of shards is what is scanned, and a shard read whole must hold the
      records the list gives it.

  Returns:
    The number of records checked.
  """
  checked = 0
  listed = manifest is not None and split in manifest.get('shards', {})
  for path, expected in records.split_shards(data_dir, split, manifest):
    limit = None if max_records is None else max_records - checked
    if limit is not None and limit <= 0:
      break
    dataset = tf.data.TFRecordDataset(path)
    if limit is not None:
      dataset = dataset.take(limit)
    dataset = dataset.map(
        lambda s: _assert_record(s, num_classes, image_size, channels),
        num_parallel_calls=tf.data.AUTOTUNE)
    try:
      found = int(dataset.reduce(tf.constant(0, tf.int64),
                                 lambda count, one: count + one))
    except tf.errors.OpError as error:
      _locate_problem(path, num_classes, image_size, channels, limit)
      raise ValueError(f'{path}: unreadable ({error.message.strip()}); '
                       f'{_REPREPARE}.') from None
    if listed and (limit is None or found < limit) and found != expected:
      raise ValueError(
          f'{path} holds {found} records but {records.MANIFEST_NAME} lists '
          f'{expected}: the file is not the one prepared (cut off, or from '
          f'another preparation); copy the set again or {_REPREPARE}.')
    checked += found
  return checked


def check_dataset(data_dir: str, manifest: Optional[Dict[str, Any]] = None,
                  splits: Iterable[str] = records.SPLITS,
                  max_records: Optional[int] = None) -> Dict[str, int]:
  """`check_split` on every split, with the manifest's classes and size.

  Only the shards the manifest lists are scanned (files it does not list
  are named in a warning, a missing one is an error: shard_list.py), each
  shard read whole is compared with its listed count, and each fully
  scanned split's record count with the manifest's. Returns {split: records
  checked}.
  """
  manifest = records.read_manifest(data_dir) if manifest is None else manifest
  counts = {}
  for split in splits:
    counts[split] = check_split(
        data_dir, split, int(manifest['num_classes']),
        manifest.get('image_size'), int(manifest.get('channels', 3)),
        max_records, manifest)
    expected = manifest.get('counts', {}).get(split)
    if (max_records is None and expected is not None and
        counts[split] != expected):
      raise ValueError(
          f'Split {split!r} in {data_dir!r} has {counts[split]} records but '
          f'{records.MANIFEST_NAME} says {expected}: a shard is missing or '
          f'left over from another preparation; {_REPREPARE}.')
  return counts
