"""Which backend Keras runs on, known before Keras is imported.

`MetaPseudoLabels` needs Keras's TensorFlow backend. Under another one,
`import keras` itself can fail before the model's module could say what to
do: KERAS_BACKEND=jax without jax installed ends in a ModuleNotFoundError
traceback from inside Keras. So keras_model.py asks here first, and this
module imports nothing that imports Keras.
"""

import json
import os
import sys
from typing import Mapping


def configured_backend(environ: Mapping[str, str]) -> str:
  """The backend Keras will run on once imported, read without importing it.

  As Keras reads it (keras/src/backend/config.py): KERAS_BACKEND unless
  empty, else the "backend" of keras.json in KERAS_HOME (else ~/.keras, or
  /tmp/.keras where the home is not writable), else TensorFlow.
  """
  if environ.get('KERAS_BACKEND'):
    return environ['KERAS_BACKEND']
  home = environ.get('KERAS_HOME')
  if home is None:
    base = os.path.expanduser('~')
    home = os.path.join(base if os.access(base, os.W_OK) else '/tmp',
                        '.keras')
  try:
    with open(os.path.join(os.path.expanduser(home), 'keras.json'),
              encoding='utf-8') as f:
      return json.load(f).get('backend', 'tensorflow')
  except (OSError, ValueError, AttributeError):   # none, or not a JSON dict
    return 'tensorflow'


def check_backend(backend: str) -> None:
  """Raises RuntimeError unless `backend` is Keras's TensorFlow backend."""
  if backend != 'tensorflow':
    raise RuntimeError(
        f'mpl_tf.MetaPseudoLabels needs the TensorFlow backend of Keras 3 '
        f'(its step uses tf.distribute and tf.GradientTape), but Keras runs '
        f'on {backend!r} (KERAS_BACKEND, else keras.json): set '
        f'KERAS_BACKEND=tensorflow before Keras is first imported. Other '
        f'backends are not supported.')


def check_before_import() -> None:
  """check_backend on the configured backend, unless Keras is imported."""
  if 'keras' not in sys.modules:
    check_backend(configured_backend(os.environ))
