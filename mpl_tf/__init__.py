"""mpl_tf: a TensorFlow 2 / Keras 3 implementation of Meta Pseudo Labels.

The library never reads command-line flags: `flags/` turns them into a frozen
`mpl_tf.config.Config`, and everything here takes that config (or one of its
parts) as an argument.
"""
