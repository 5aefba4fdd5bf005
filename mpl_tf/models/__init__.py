"""One builder by name for teacher and student (they share an architecture).

Names (docs/models.md has the layouts, sources and parameter counts):
  wrn-<depth>-<k>       WideResNet as the released code (wrn-28-2, wrn-28-10).
  wrn-28-large          the released code's Wrn28k(k=135): widths 135/270/540.
  resnet-50             ResNet-50 v1.5 (stride on the 3x3 conv).
  efficientnet-<v>      v in bs, b0..b8, l2, b5-mpl, b6-mpl: Keras's
                        EfficientNet edited to the released layout.

Every network maps float32 images [N, size, size, 3], already normalised by
the input pipeline, to float32 logits [N, num_classes]; takes its batch-norm
momentum, epsilon and cross-replica synchronisation, its dropout, stochastic
depth and dtype policy from ModelConfig; and never changes Keras's global
dtype policy.
"""

import contextlib
import re
from typing import Callable, List, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from mpl_tf.config import ConfigError, ModelConfig
from mpl_tf.models import common
from mpl_tf.models import efficientnet
from mpl_tf.models import resnet
from mpl_tf.models import wide_resnet

_WRN = re.compile(r'^wrn-(\d+)-(\d+)$')
KNOWN_NAMES = ('wrn-<depth>-<width> (e.g. wrn-28-2, wrn-28-10)',
               'wrn-28-large', 'resnet-50') + tuple(efficientnet.VARIANTS)

without_weights = common.without_weights


def build_model(model_config: ModelConfig, num_classes: int, image_size: int,
                name: str) -> keras.Model:
  """Builds the network named by `model_config.name` (e.g. 'wrn-28-2').

  Raises:
    ConfigError: the name is unknown, or a WRN depth is not 6n+4.
  """
  model_name = model_config.name
  args = dict(num_classes=num_classes, image_size=image_size, name=name)
  if model_name == 'wrn-28-large':
    return wide_resnet.wide_resnet(
        model_config, depth=28, stem_filters=wide_resnet.LARGE_STEM_FILTERS,
        widths=wide_resnet.LARGE_WIDTHS, **args)
  match = _WRN.match(model_name)
  if match:
    depth, width = int(match.group(1)), int(match.group(2))
    if (depth - 4) % 6 or depth < 10:
      raise ConfigError(f'model={model_name!r}: WRN depth must be 6n+4 '
                        f'(10, 16, 22, 28, ...).')
    return wide_resnet.wide_resnet(
        model_config, depth=depth, stem_filters=16 * width,
        widths=(16 * width, 32 * width, 64 * width), **args)
  if model_name == 'resnet-50':
    return resnet.resnet_v15(model_config, **args)
  if model_name in efficientnet.VARIANTS:
    return efficientnet.efficientnet(model_config, model_name, **args)
  raise ConfigError(f'model={model_name!r} is unknown; known models: '
                    f'{", ".join(KNOWN_NAMES)}.')


def count_parameters(model_config: ModelConfig, num_classes: int,
                     image_size: int) -> Tuple[int, int]:
  """(trainable, batch-norm statistics) of a network, without its weights.

  Builds the network inside `without_weights`, so even efficientnet-l2 costs
  a few seconds and no memory for weights; the counts come from the same
  code path as `build_model`.
  """
  with without_weights():
    model = build_model(model_config, num_classes, image_size, 'count')
    trainable = _size(model.trainable_weights)
    total = _size(model.weights)
  return trainable, total - trainable


def _size(variables) -> int:
  return sum(int(np.prod(v.shape)) for v in variables)


def random_states(*models: keras.Model) -> List[keras.Variable]:
  """The seed-generator states of the models' random layers, by object.

  Dropout (and stochastic depth) draw their masks from these states; Keras
  does not put them in a tf.train.Checkpoint of the model, so the loop saves
  them itself, or a resumed run would draw different masks. A pass that must
  be repeated exactly (MplStep's rematerialized teacher) restores them.
  """
  states, seen = [], set()
  for model in models:
    for layer in model._flatten_layers(include_self=True):  # pylint: disable=protected-access
      for value in vars(layer).values():
        if (isinstance(value, keras.random.SeedGenerator) and
            id(value.state) not in seen):
          seen.add(id(value.state))
          states.append(value.state)
  return states


# Added to the first word of every seed-generator state on replica r (times
# r): far from the states any replica reaches by counting draws.
_REPLICA_SEED_STRIDE = 1_000_003


def replica_distinct_randomness(replica_step: Callable,
                                states: Sequence[keras.Variable]) -> Callable:
  """`replica_step` with dropout and stochastic-depth masks drawn per replica.

  Keras's seed-generator states are mirrored variables: every replica holds
  the same state and so draws the same masks for its own, different images,
  which makes N replicas' masks N copies of one. Around each step, replica r
  shifts its copy of every state by r * stride and shifts it back after the
  step, so the masks differ between replicas, replica 0 draws exactly what a
  single device draws, and the states stay equal on every replica (each
  replica advances its copy by the same count of draws), as checkpoints and
  a rematerialized pass need. Pseudo-label draws do not use these states:
  they are drawn by global row (MplStep) and stay replica-count invariant.
  """
  if not states:
    return replica_step

  def step(*args, **kwargs):
    context = tf.distribute.get_replica_context()
    replica = 0 if context is None else context.replica_id_in_sync_group
    shift = replica_seed_shift(replica, states[0].dtype)
    for state in states:
      state.assign(state.value + tf.cast(shift, state.dtype))
    outputs = replica_step(*args, **kwargs)
    with tf.control_dependencies(tf.nest.flatten(outputs)):
      for state in states:
        state.assign(state.value - tf.cast(shift, state.dtype))
    return outputs

  return step


def replica_seed_shift(replica, dtype) -> tf.Tensor:
  """What replica `replica` adds to every seed-generator state: [r * stride, 0].

  In the states' own dtype, so it wraps as theirs do; microbatches.py shifts
  chunk k of replica r by the shift of replica r*K+k the same way.
  """
  offset = tf.cast(replica, dtype) * _REPLICA_SEED_STRIDE
  return tf.stack([offset, tf.zeros_like(offset)])


def batch_norm_statistics(model: keras.Model) -> List[keras.Variable]:
  """The moving mean and variance of every batch-norm layer, by object."""
  stats = []
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if isinstance(layer, keras.layers.BatchNormalization):
      stats.extend([layer.moving_mean, layer.moving_variance])
  return stats


def batch_norm_offsets_and_variances(model: keras.Model
                                     ) -> List[keras.Variable]:
  """Every batch-norm layer's offset beta and moving variance, by object.

  The variables the released code names `.../beta` and
  `.../moving_variance` (modeling_utils.sync_batch_norm), the only released
  names that contain "beta" or "variance": those its EMA starts at 1
  (ema.initialize, 'released_code').
  """
  variables = []
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if isinstance(layer, keras.layers.BatchNormalization):
      if layer.center:
        variables.append(layer.beta)
      variables.append(layer.moving_variance)
  return variables


def normalization_weights(model: keras.Model) -> List[keras.Variable]:
  """Trainable weights of normalisation layers (exempt from weight decay)."""
  weights = []
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if isinstance(layer, (keras.layers.BatchNormalization,
                          keras.layers.LayerNormalization)):
      weights.extend(layer.trainable_weights)
  return weights


@contextlib.contextmanager
def restored_afterwards(variables: Sequence[tf.Variable]):
  """Puts `variables` back to their values at entry when the block ends.

  For passes that must not leave a trace in the state they touch (batch-norm
  moving statistics, dropout RNG states). Inside a tf.function the restores
  follow the block's updates of the same variables by TensorFlow's automatic
  control dependencies, as in eager execution.
  """
  saved = [tf.identity(v.value) for v in variables]
  yield
  for variable, value in zip(variables, saved):
    variable.assign(value)
