"""The batches `MetaPseudoLabels.fit` takes: their forms, and their checks.

A module of its own because the checks are a list that grows with every
wrong input a user finds, and keras_model.py is about the model (what it
owns, saves and logs). A wrong batch must stop fit() with one error naming
the input and the fix, before the step changes any variable: what is known
at trace time raises ValueError while fit() traces its step; what only the
device knows becomes tf.debugging asserts every op of the step depends on.
"""

from typing import Dict, List, Optional

import tensorflow as tf

BATCH_KEYS = ('labeled_images', 'labels', 'unlabeled_images_ori',
              'unlabeled_images_aug')


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
