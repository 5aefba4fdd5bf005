"""mpl_tf: a TensorFlow 2 / Keras 3 implementation of Meta Pseudo Labels.

The library never reads command-line flags: `flags/` turns them into a frozen
`mpl_tf.config.Config`, and everything here takes that config (or one of its
parts) as an argument.

`mpl_tf.MetaPseudoLabels` (keras_model.py) is MPL as a Keras model, for
`fit()`. It is loaded on first use, so that `import mpl_tf.config` and other
light modules do not import TensorFlow and Keras.
"""


def __getattr__(name: str):
  if name == 'MetaPseudoLabels':
    from mpl_tf.keras_model import MetaPseudoLabels  # pylint: disable=g-import-not-at-top
    return MetaPseudoLabels
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
