"""Prepares a data set for training: `python prepare.py --source=...`.

The command line of mpl_tf/data/prepare.py, kept thin like main.py: flags
(flags/prepare_flags.py) -> one validated PrepareConfig -> prepare.prepare.
Bad flags, missing data or bad images end with one message on stderr and
exit status 2, without a traceback; docs/data.md has the commands for
CIFAR-10, SVHN, ImageNet and folders of your own images.
"""

import os
import sys
from typing import Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top

from flags import prepare_flags  # pylint: disable=g-import-not-at-top
from mpl_tf.data import prepare  # pylint: disable=g-import-not-at-top

_USAGE = """\
Prepares a data set for mpl_tf training (see docs/data.md).

  python prepare.py --source=tfds --tfds_name=cifar10 \\
      --tfds_data_dir=~/tensorflow_datasets --split_rule=cifar10_4k \\
      --out_dir=data/cifar10_4k
  python prepare.py --source=folder --train_dir=photos/train \\
      --test_dir=photos/test --split_rule=custom --labeled_per_class=20 \\
      --validation_per_class=10 --out_dir=data/photos
"""


def run_cli(argv: Sequence[str]) -> int:
  """The command line: parses argv, prepares; returns the exit status.

  0 on success; 2, with one message on stderr and no traceback, for bad
  flags, missing data or bad images.
  """
  flag_values = absl_flags.FlagValues()
  prepare_flags.define(flag_values)
  if any(arg in ('-h', '--help', '-help', '--helpfull') for arg in argv[1:]):
    print(_USAGE + '\n' + flag_values.get_help())
    return 0
  try:
    leftover = flag_values(list(argv))
    if len(leftover) > 1:
      raise absl_flags.Error(f'unexpected arguments: {" ".join(leftover[1:])}')
  except absl_flags.Error as error:
    print(f'error: {error}\nRun with --help to list the flags.',
          file=sys.stderr)
    return 2
  try:
    prepare.prepare(prepare_flags.to_config(flag_values), log=print)
  except (ValueError, FileNotFoundError, ImportError) as error:
    # Source readers, split rules and writers raise these naming the fix.
    print(f'error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(run_cli(sys.argv))
