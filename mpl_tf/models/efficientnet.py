"""EfficientNets built by Keras, edited to the released MPL code's layout.

Keras's generic builder, `keras.src.applications.efficientnet.EfficientNet`
(the function behind `keras.applications.EfficientNetB0..B7`, which takes
the width and depth coefficients), already builds the released code's
network (spec section 5.4): the same seven stages, filter rounding to
multiples of 8 (never more than 10% down), ceil(depth * repeats) blocks,
squeeze-and-excitation at 0.25 of the block's *input* filters with biased
1x1 convs, swish, residuals only where stride is 1 and the width is kept,
stochastic depth rate * block_index / num_blocks applied to the residual
branch with 1/keep rescaling, and the head conv1x1(fil(1280)) -> BN ->
swish -> global average pool -> dropout -> dense with U(-1/sqrt(K),
1/sqrt(K)) kernels. Its public B0..B7 are the generic builder at fixed
coefficients, so the generic builder is called for every variant, including
the released code's wide `b5-mpl`/`b6-mpl` and `l2`, which Keras has no
name for.

What this file changes, all by editing the Keras-built functional model's
config before `keras.Model.from_config` (no block is written by hand):
  * The `Rescaling` and `Normalization` input layers are removed: the input
    pipeline normalises, and the released network takes images as they are.
  * The explicit `ZeroPadding2D` layers before strided convs are removed and
    those convs pad SAME, the released code's padding. (On even-sized inputs
    Keras's padding is the same as SAME; on odd ones this keeps it so.)
  * Small images: the released code uses stride s for the stem and for the
    first blocks of stages 2 and 3, with s = 1 for CIFAR/SVHN/TinyImages
    (chosen there by the dataset's name) and 2 otherwise. We choose by size:
    s = 1 when image_size <= SMALL_IMAGE_MAX_SIZE (64), else 2. So 32x32
    inputs end in an 8x8 feature map (as WRN-28-k) and 224x224 in 7x7.
  * Batch norm: momentum, epsilon and `synchronized` from ModelConfig, and
    its class (`batch_norm_kernel`: the fused kernel's subclass or Keras's).
  * Conv and depthwise kernels: He-normal on fan-out *untruncated*, as the
    released code (Keras draws a truncated normal with the same variance).
  * Every layer gets the model's dtype policy, and a float32 linear layer
    named `logits` is appended after the classifier.
Dropout and stochastic depth are Keras's own arguments (`dropout_rate`,
`drop_connect_rate`), set from ModelConfig.
"""

import copy
from typing import Any, Dict

import keras
from keras.src.applications import efficientnet as keras_efficientnet

from mpl_tf.config import ModelConfig
from mpl_tf.models import common

# name: (width coefficient, depth coefficient, the released code's eval
# resolution). The released table's dropout column is ignored there too; the
# model config's dropout_rate is used instead.
VARIANTS = {
    'efficientnet-bs': (0.5, 1.0, 224),
    'efficientnet-b0': (1.0, 1.0, 224),
    'efficientnet-b1': (1.0, 1.1, 240),
    'efficientnet-b2': (1.1, 1.2, 260),
    'efficientnet-b3': (1.2, 1.4, 300),
    'efficientnet-b4': (1.4, 1.8, 380),
    'efficientnet-b5': (1.6, 2.2, 456),
    'efficientnet-b6': (1.8, 2.6, 528),
    'efficientnet-b7': (2.0, 3.1, 600),
    'efficientnet-b8': (2.2, 3.6, 672),
    'efficientnet-l2': (4.3, 5.3, 600),
    'efficientnet-b5-mpl': (5.0, 2.2, 800),
    'efficientnet-b6-mpl': (5.0, 2.6, 800),
}

# Inputs up to this size get stride 1 where the released code uses s.
SMALL_IMAGE_MAX_SIZE = 64
# The convs that stride by s: the stem and the first blocks of stages 2, 3.
_STRIDE_S_LAYERS = ('stem_conv', 'block2a_dwconv', 'block3a_dwconv')
_INPUT_SCALING = ('Rescaling', 'Normalization')


def stem_stride(image_size: int) -> int:
  return 1 if image_size <= SMALL_IMAGE_MAX_SIZE else 2


def efficientnet(model_config: ModelConfig, variant: str, num_classes: int,
                 image_size: int, name: str) -> keras.Model:
  """Builds `variant` (a key of VARIANTS); returns float32 logits [N, K]."""
  width, depth, resolution = VARIANTS[variant]
  # The Keras-built network is only read for its config, so its weights are
  # never allocated (they would be 1.9 GB for efficientnet-l2).
  with common.without_weights():
    keras_built = keras_efficientnet.EfficientNet(
        width, depth, resolution,
        dropout_rate=model_config.dropout_rate,
        drop_connect_rate=model_config.stochastic_depth_rate,
        weights=None,
        input_tensor=keras.Input((image_size, image_size, 3), name='images'),
        classes=num_classes, classifier_activation=None, name=name)
    config = keras_built.get_config()
  config = released_code_config(config, model_config, image_size)
  network = keras.Model.from_config(config)
  logits = common.float32_logits(network.output)
  # Keras's builder keeps its input in a one-element list; a bare input gives
  # the same call and serving signatures as the other families.
  (images,) = network.inputs
  return keras.Model(images, logits, name=name)


def released_code_config(config: Dict[str, Any], model_config: ModelConfig,
                         image_size: int) -> Dict[str, Any]:
  """Edits (in place) a Keras EfficientNet's config as the module says."""
  layers = config['layers']
  for layer in [l for l in layers
                if l['class_name'] in _INPUT_SCALING + ('ZeroPadding2D',)]:
    consumers = _bypass(layers, layer)
    layers.remove(layer)
    if layer['class_name'] == 'ZeroPadding2D':
      for consumer in consumers:
        consumer['config']['padding'] = 'same'

  stride = stem_stride(image_size)
  policy = keras.dtype_policies.serialize(common.dtype_policy(model_config))
  initializer = keras.initializers.serialize(common.conv_initializer())
  batch_norm_class = _serialized_class(common.batch_norm_class(model_config))
  for layer in layers:
    # Built shapes are recomputed by from_config; the recorded ones predate
    # the removed padding.
    layer.pop('build_config', None)
    layer_config = layer['config']
    kind = layer['class_name']
    if kind == 'InputLayer':
      continue
    layer_config['dtype'] = copy.deepcopy(policy)
    if kind == 'BatchNormalization':
      layer_config.update(common.batch_norm_kwargs(model_config))
      layer.update(batch_norm_class)
    elif kind == 'Conv2D':
      layer_config['kernel_initializer'] = copy.deepcopy(initializer)
    elif kind == 'DepthwiseConv2D':
      layer_config['depthwise_initializer'] = copy.deepcopy(initializer)
    if layer['name'] in _STRIDE_S_LAYERS:
      layer_config['strides'] = [stride, stride]
  return config


def _serialized_class(cls: type) -> Dict[str, Any]:
  """The keys of a layer's serialized config that name its class."""
  serialized = keras.saving.serialize_keras_object(cls(name='class_only'))
  return {key: serialized[key]
          for key in ('module', 'class_name', 'registered_name')}


def _bypass(layers, removed) -> list:
  """Rewires the consumers of `removed` to its input; returns them."""
  (node,) = removed['inbound_nodes']
  (source,) = node['args']
  source_history = source['config']['keras_history']
  consumers = []

  def rewire(value) -> bool:
    if isinstance(value, dict):
      if value.get('class_name') == '__keras_tensor__':
        history = value['config']['keras_history']
        if history[0] != removed['name']:
          return False
        value['config']['keras_history'] = list(source_history)
        return True
      return any([rewire(v) for v in value.values()])
    if isinstance(value, (list, tuple)):  # get_config() nests tuples
      return any([rewire(v) for v in value])
    return False

  for layer in layers:
    if layer is not removed and rewire(layer['inbound_nodes']):
      consumers.append(layer)
  return consumers
