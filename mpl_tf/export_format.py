"""What makes a directory an mpl_tf export: its names and completion marker.

export.py writes exports; serving.py and evaluate.py read them, and
checkpoints.py refuses one where a checkpoint is expected. All of them need
the signature and input names, the metadata path and the completion test,
so these live here rather than in export.py, which restores checkpoints and
so cannot be imported by checkpoints.py without an import circle.
"""

import os

import tensorflow as tf

SIGNATURE_KEY = 'serving_default'
INPUT_KEY = 'images'
METADATA_DIR = 'assets.extra'
METADATA_NAME = 'mpl_tf_export.json'
# The completion marker, relative to the export directory.
METADATA_PATH = f'{METADATA_DIR}/{METADATA_NAME}'
SAVED_MODEL_NAME = 'saved_model.pb'


def is_export(path: str) -> bool:
  """Whether `path` is a complete mpl_tf export (else: a checkpoint).

  Complete means its marker, the metadata written last, is there.
  """
  return tf.io.gfile.exists(os.path.join(path, METADATA_PATH))


def looks_like_export(path: str) -> bool:
  """Whether `path` holds SavedModel files, complete or not."""
  return any(tf.io.gfile.exists(os.path.join(path, name))
             for name in (SAVED_MODEL_NAME, 'variables', METADATA_DIR))


def incomplete_export_message(path: str) -> str:
  return (f'{path!r} holds SavedModel files but no {METADATA_PATH}, which an '
          f'mpl_tf export writes last: the export (or a copy of it) is still '
          f'being written or was interrupted, or it is not an mpl_tf export. '
          f'Wait for it to finish, or export again: python main.py '
          f'--flagfile=... --mode=export --export_dir={path}.')