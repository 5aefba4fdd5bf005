"""Runs Meta Pseudo Labels from absl flags: `python main.py --flagfile=...`.

Kept thin on purpose: flags -> one frozen Config -> mpl_tf.app.run, which
trains (`--mode=train`, resuming from --model_dir), evaluates, exports or
predicts. User errors (bad flags, missing or inconsistent data, a missing
checkpoint) end with one message and exit status 2, without a traceback.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

from flags import definitions  # pylint: disable=g-import-not-at-top

definitions.define()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mpl_tf import app as mpl_app  # pylint: disable=g-import-not-at-top
  from mpl_tf.config import ConfigError  # pylint: disable=g-import-not-at-top
  # TensorFlow's INFO/WARNING chatter (e.g. keras-cv's vectorisation notes,
  # checkpoint timings) would bury the progress lines; errors still show.
  tf.get_logger().setLevel('ERROR')
  logging.set_verbosity(logging.ERROR)
  try:
    config = definitions.to_config()
    print(config.to_json())
    mpl_app.run(config)
  except (ConfigError, FileNotFoundError, ValueError) as error:
    # Data and config modules raise these with a message naming the fix.
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
