"""Runs Meta Pseudo Labels from absl flags: `python main.py --flagfile=...`.

Kept thin on purpose: flags -> one frozen Config -> mpl_tf.app.run, which
trains (`--mode=train`, resuming from --model_dir), evaluates, exports or
predicts. User errors (unknown or bad flags, missing or inconsistent data, an
unwritable model_dir, a missing checkpoint, a non-finite loss under
--nonfinite=stop) end with one message and exit status 2, without a
traceback. A cluster that cannot start or loses a worker mid-run
(--strategy=multi_worker) ends with one line and status 3; SIGTERM or Ctrl-C
while a worker waits for the others ends it with 143 or 130.
"""

import os
import signal
import sys
import warnings

# Before TensorFlow starts its threads or allocates: large buffers are reused
# instead of being faulted in again every step (MPL_TF_MALLOC_TUNING=0 turns
# it off; mpl_tf/malloc_tuning.py says why).
from mpl_tf import malloc_tuning  # pylint: disable=g-import-not-at-top

malloc_tuning.tune()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

from flags import definitions  # pylint: disable=g-import-not-at-top

definitions.define()


def _user_error(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl's parsing, but an unknown or malformed flag is one line, status 2."""
  try:
    return absl_flags.FLAGS(argv)
  except absl_flags.Error as error:
    _user_error(f'{error}. Run `python main.py --helpfull` for every flag.')


def main(argv):
  if len(argv) > 1:
    _user_error(f'unexpected arguments: {" ".join(argv[1:])}; every setting '
                f'is a --flag (python main.py --helpfull).')
  verbose = absl_flags.FLAGS.verbose
  if not verbose:
    # TensorFlow's C++ start-up lines (CUDA probing on a machine without a
    # GPU, CPU feature notes) and Python warnings of its dependencies; a
    # user's own TF_CPP_MIN_LOG_LEVEL wins.
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    warnings.filterwarnings('ignore')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mpl_tf import app as mpl_app  # pylint: disable=g-import-not-at-top
  from mpl_tf import cluster  # pylint: disable=g-import-not-at-top
  from mpl_tf.cluster import StopRequested  # pylint: disable=g-import-not-at-top
  from mpl_tf.config import ConfigError  # pylint: disable=g-import-not-at-top
  from mpl_tf.phase import NonFiniteError  # pylint: disable=g-import-not-at-top
  # TensorFlow's INFO/WARNING chatter (e.g. keras-cv's vectorisation notes,
  # checkpoint timings) would bury the progress lines; errors still show.
  if not verbose:
    tf.get_logger().setLevel('ERROR')
    logging.set_verbosity(logging.ERROR)
  try:
    config = definitions.to_config()
    definitions.check_paths_outlive_the_command(config)
    if verbose:
      print(config.to_json())
    else:
      print(config.summary())
      if config.run.mode == 'train':
        print(f'  (every setting: '
              f'{os.path.join(config.run.model_dir, "config.json")}; '
              f'--verbose prints them here)')
    mpl_app.run(config)
  except (ConfigError, FileNotFoundError, ValueError, NonFiniteError) as error:
    # Data and config modules raise these with a message naming the fix;
    # NonFiniteError names the step and the term (--nonfinite=stop).
    _user_error(str(error))
  except cluster.ClusterError as error:
    # A worker missing at the start or lost mid-run: the message says which
    # and what to do (start or restart every worker with the same command).
    print(f'error: {error}', file=sys.stderr)
    sys.exit(cluster.CLUSTER_FAILURE_STATUS)
  except cluster.StartInterrupted as stopped:
    print(f'stopped: {stopped}', file=sys.stderr)
    sys.exit(128 + stopped.signum)
  except StopRequested as stopped:
    # SIGTERM (a preemption, `kill`): a checkpoint was saved first. The
    # status is the shell's for a SIGTERM death, so supervisors that restart
    # preempted jobs see what happened.
    print(f'stopped: {stopped}', file=sys.stderr)
    sys.exit(128 + signal.SIGTERM)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
