"""The batches `MetaPseudoLabels.fit` takes: their forms, and their checks.

A module of its own because the checks are a list that grows with every
wrong input a user finds, and keras_model.py is about the model (what it
owns, saves and logs). A wrong batch fed to MplStep either fails deep inside
it with a raw op error (ConcatV2, incompatible shapes) or, worse, trains on
wrong numbers without a word: labels [B, 1] broadcast against [B] and make
the supervised losses about B times too large; labels outside [0, classes)
one-hot to zero rows and add no loss; a partial last batch is divided by the
full batch size. Here each gets one error naming the input and the fix,
before the step changes any variable.

What is known at trace time (the batch's form, dtypes, ranks, static sizes,
the networks' class counts) is checked in Python while fit() traces its
step: ValueError, at no cost per step. What only the device knows (label
values, sizes left dynamic) becomes tf.debugging asserts that every op of
the step depends on (`checked_batch`). XLA compiles asserts to nothing, so
under jit_compile the model compiles the step alone and keeps these checks
outside it (keras_model.MetaPseudoLabels.make_train_function).
"""

from typing import Callable, Dict, List, Optional, Tuple

import keras
import tensorflow as tf

BATCH_KEYS = ('labeled_images', 'labels', 'unlabeled_images_ori',
              'unlabeled_images_aug')
IMAGE_KEYS = ('labeled_images', 'unlabeled_images_ori', 'unlabeled_images_aug')
# Said wherever a tensor is not what its place needs: a 4-tuple in another
# order is the usual cause (labels where images should be).
_ORDER = ('A tuple batch is (labeled_images, labels, unlabeled_images_ori, '
          'unlabeled_images_aug), in this order, or ((labeled_images, '
          'labels), (unlabeled_images_ori, unlabeled_images_aug))')


def parse_batch(data) -> Optional[Dict[str, tf.Tensor]]:
  """The step's batch dict from any accepted form, or None."""
  if (isinstance(data, tuple) and len(data) in (1, 3) and
      isinstance(data[0], dict) and all(d is None for d in data[1:])):
    data = data[0]   # (x,) or (x, None, None): train_on_batch, arrays
  if isinstance(data, dict):
    return {key: data[key] for key in BATCH_KEYS} if all(
        key in data for key in BATCH_KEYS) else None
  if not isinstance(data, (tuple, list)):
    return None
  parts = tuple(data)
  if len(parts) == 2 and all(isinstance(p, (tuple, list)) and len(p) == 2
                             for p in parts):
    parts = (*parts[0], *parts[1])
  if len(parts) == 4 and all(tf.is_tensor(p) for p in parts):
    return dict(zip(BATCH_KEYS, parts))
  return None


def as_mpl_batch(data) -> Dict[str, tf.Tensor]:
  """The step's batch dict; ValueError naming the accepted forms if none."""
  batch = parse_batch(data)
  if batch is not None:
    return batch
  if isinstance(data, dict):
    missing = ', '.join(key for key in BATCH_KEYS if key not in data)
    found = f'a dict without {missing}'
  else:
    found = f'{type(data).__name__} {tf.nest.map_structure(type, data)}'
  raise ValueError(
      f'MetaPseudoLabels.fit takes batches that are a dict with the keys '
      f'{", ".join(BATCH_KEYS)}; a tuple of those four tensors in that '
      f'order; or ((labeled_images, labels), (unlabeled_images_ori, '
      f'unlabeled_images_aug)). Got {found}.')


def output_classes(role: str, network: keras.Model,
                   images: Optional[tf.Tensor] = None) -> Optional[int]:
  """The number of classes `network` outputs logits for, or None if unknown.

  Functional and Sequential networks know their output shape when built;
  a subclassed one only once it has images to run on: with `images` (at
  fit()'s first trace), its output is computed symbolically, without
  running it. ValueError unless the output is one [batch, classes] tensor.
  """
  try:
    shape = network.output_shape
  except AttributeError:   # subclassed
    if images is None:
      return None
    shape = network.compute_output_spec(
        keras.KerasTensor(images.shape, images.dtype)).shape
  if (not isinstance(shape, (tuple, list)) or len(shape) != 2 or
      not all(d is None or isinstance(d, int) for d in shape) or
      shape[1] is None):
    raise ValueError(
        f'MetaPseudoLabels: the {role} must map images to one logits tensor '
        f'[batch, classes]; its output shape is {shape}.')
  return shape[1]


def check_class_counts(teacher_classes: int, student_classes: int) -> None:
  if teacher_classes != student_classes:
    raise ValueError(
        f'MetaPseudoLabels: the teacher outputs logits for '
        f'{teacher_classes} classes and the student for {student_classes}; '
        f'the student learns from the teacher\'s pseudo labels, so both '
        f'need one output per class of the labels.')


def _describe(tensor: tf.Tensor) -> str:
  shape = 'unknown' if tensor.shape.rank is None else list(tensor.shape)
  return f'{tensor.dtype.name} of shape {shape}'


def _check_images(batch: Dict[str, tf.Tensor]) -> None:
  """The images: real numbers [batch, ...], one dtype and example shape.

  Any integer or floating dtype is accepted (uint8 too): Keras casts a
  network's inputs to its own dtype, values unchanged, so scaling them is
  the pipeline's or the network's (a Rescaling layer). The three share one
  dtype and one example shape because the step runs the teacher once on
  their concatenation. A mix of dtypes is refused, not cast: uint8 labeled
  and float unlabeled images are most often two pipelines that scale
  differently (0..255 and 0..1), which a cast would hide.
  """
  for key in IMAGE_KEYS:
    images = batch[key]
    if (not (images.dtype.is_floating or images.dtype.is_integer) or
        images.shape.rank is not None and images.shape.rank < 2):
      raise ValueError(
          f'MetaPseudoLabels: {key} is {_describe(images)}, not images: '
          f'images are [batch, ...] tensors of an integer or floating '
          f'dtype. Is the batch in another order? {_ORDER}.')
  first = batch[IMAGE_KEYS[0]]
  for key in IMAGE_KEYS[1:]:
    images = batch[key]
    if (images.dtype != first.dtype or
        not images.shape[1:].is_compatible_with(first.shape[1:])):
      raise ValueError(
          f'MetaPseudoLabels: {IMAGE_KEYS[0]} is {_describe(first)} and '
          f'{key} {_describe(images)}; the step runs the teacher on the '
          f'three image tensors at once, so they need one dtype and one '
          f'example shape: prepare them alike (same scaling, then one '
          f'tf.cast). {_ORDER}.')


def _labels(labels: tf.Tensor) -> tf.Tensor:
  """The labels as [batch] integer class ids: [batch] or [batch, 1] taken.

  [batch, 1] is what keras.datasets gives and what Keras's own sparse losses
  accept, so it is taken too, squeezed statically (exactly the same ids; a
  user of those data sets would otherwise reshape for nothing). Floats are
  refused, even whole numbers: a cast would truncate 2.7 to 2 without a
  word, and float [batch, classes] is one-hot or soft labels, which MPL's
  labeled losses do not take.
  """
  shape = labels.shape
  if labels.dtype.is_floating or (shape.rank == 2 and
                                  shape[1] not in (1, None)):
    raise ValueError(
        f'MetaPseudoLabels: labels are {_describe(labels)}; they must be '
        f'integer class ids [batch] (or [batch, 1]). One-hot or probability '
        f'labels: pass tf.argmax(labels, axis=-1); whole-number floats: '
        f'tf.cast(labels, tf.int32). {_ORDER}.')
  if (not labels.dtype.is_integer or shape.rank not in (1, 2) or
      shape.rank == 2 and shape[1] is None):
    raise ValueError(
        f'MetaPseudoLabels: labels are {_describe(labels)}; they must be '
        f'integer class ids of static shape [batch] (or [batch, 1]). '
        f'{_ORDER}.')
  return tf.squeeze(labels, axis=1) if shape.rank == 2 else labels


def _range_check(labels: tf.Tensor, num_classes: int) -> tf.Operation:
  """Device assert: every label in [0, num_classes), naming the first not."""
  wide = tf.cast(labels, tf.int64)   # uint64 beyond int64 becomes negative
  bad = tf.logical_or(wide < 0, wide >= num_classes)
  row = tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int32)
  return tf.debugging.Assert(
      tf.logical_not(tf.reduce_any(bad)),
      [f'MetaPseudoLabels: labels must be class ids in [0, {num_classes}) '
       f'(the networks output {num_classes} classes); the batch has label',
       tf.gather(wide, row), 'at row', row, '(of this replica). Class ids '
       'are 0-based: subtract 1 from 1-based labels.'])


def size_checks(step, batch: Dict[str, tf.Tensor]) -> List[tf.Operation]:
  """Checks that the batch has the global batches' sizes.

  `step` is the MplStep; its global batches are inferred from the first
  batch if compile() did not give them. Raises at once where the sizes are
  static; returns run-time checks for the others.
  """
  replicas = tf.distribute.get_replica_context().num_replicas_in_sync
  if not step.global_labeled_batch:   # inferred once, from the first batch
    labeled = batch['labeled_images'].shape[0]
    unlabeled = batch['unlabeled_images_ori'].shape[0]
    if labeled is None or unlabeled is None:
      raise ValueError(
          'MetaPseudoLabels: the batch sizes are not static, so the global '
          'batches the losses are divided by cannot be read from the '
          'first batch: batch the dataset with drop_remainder=True, or '
          'pass labeled_batch_size and unlabeled_batch_size to compile().')
    step.global_labeled_batch = labeled * replicas
    step.global_unlabeled_batch = unlabeled * replicas
  checks = []
  for key in BATCH_KEYS:
    size = (step.global_labeled_batch if key in BATCH_KEYS[:2] else
            step.global_unlabeled_batch)
    if size % replicas:
      raise ValueError(f'MetaPseudoLabels: a global batch of {size} does '
                       f'not split between {replicas} replicas.')
    message = (
        f'MetaPseudoLabels: a batch whose {key} is not {size} rows (over '
        f'{replicas} replica(s)). The losses are divided by the global '
        f'batch, so every batch must have its size: batch the dataset '
        f'with drop_remainder=True (a finite dataset\'s last batch is '
        f'partial otherwise).')
    rows = batch[key].shape[0]
    if rows is not None and rows * replicas != size:
      raise ValueError(f'{message} It has {rows * replicas}.')
    if rows is None:
      checks.append(tf.debugging.assert_equal(
          tf.shape(batch[key])[0], size // replicas, message=message))
  return checks


def checked_batch(data, step, num_classes: Callable[[tf.Tensor], int]
                  ) -> Tuple[Dict[str, tf.Tensor], List[tf.Operation]]:
  """The step's batch from fit()'s `data`, and the checks to run first.

  Raises ValueError for what is wrong at trace time: the form, the images
  (`_check_images`), the labels' dtype and shape (`_labels`), static sizes
  (`size_checks`). Returns the batch, with [batch, 1] labels squeezed, and
  the device checks every op of the step must depend on: dynamic sizes and
  the labels' range [0, num_classes(labeled_images)), the networks' class
  count (asked for once the images are known to be images).
  """
  batch = as_mpl_batch(data)
  _check_images(batch)
  batch['labels'] = _labels(batch['labels'])
  checks = size_checks(step, batch)
  classes = num_classes(batch['labeled_images'])
  return batch, checks + [_range_check(batch['labels'], classes)]
