"""Flags of `python prepare.py`, grouped, and their one reader.

`define(flag_values)` declares them; `to_config(flag_values)` reads them
once into a frozen, validated `mpl_tf.data.prepare.PrepareConfig`. Defaults
come from that dataclass, so a flag and its field cannot disagree; None
means "the split rule's default" (see mpl_tf/data/splits.py).
"""

import dataclasses

from absl import flags as absl_flags

from mpl_tf import storage
from mpl_tf.data import prepare as prepare_lib
from mpl_tf.data import splits

_DEFAULTS = prepare_lib.PrepareConfig()

# group -> {field: help}. Enums are declared separately below.
_HELP = {
    'source': {
        'tfds_name': 'TFDS data set already prepared in --tfds_data_dir, e.g. '
                     'cifar10, svhn_cropped, imagenet2012 (never downloaded).',
        'tfds_data_dir': 'TFDS data_dir holding <tfds_name>/<version>/.',
        'tfds_train_split': 'TFDS split to draw labeled, unlabeled and '
                            'validation images from (e.g. train, '
                            'train+extra).',
        'tfds_test_split': 'TFDS split used as the test split: auto '
                           '(validation for imagenet2012, else test), none, '
                           'or a split name.',
        'train_dir': 'Folder with one sub-folder of images per class; class '
                     'i is the i-th sub-folder name in sorted order.',
        'test_dir': 'Optional folder of test images, with the same class '
                    'sub-folder names.',
        'npz_path': '.npz with images (uint8 [N,H,W,3]) and labels, '
                    'optionally test_images, test_labels, class_names '
                    '(or x_train, y_train, x_test, y_test).',
    },
    'split': {
        'seed': 'Seed of the split draw; the same seed gives the same '
                'splits.',
        'labeled_per_class': 'Labeled images per class (default: the '
                             'rule\'s: 400 cifar10_4k, 100 svhn_1k).',
        'labeled_fraction': 'Labeled fraction of each class, rounded half up '
                            '(default: 0.1 for imagenet_10pct).',
        'validation_per_class': 'Class-balanced validation images per class '
                                '(default: 500 cifar10_4k/svhn_1k, 25 '
                                'imagenet_10pct, 0 custom).',
        'num_validation': 'Validation images drawn at random over all '
                          'classes, instead of --validation_per_class.',
        'num_test': 'Test images held out of the training split at random, '
                    'for sources without a test split.',
        'unlabeled_includes_labeled': 'Also put the labeled images in the '
                                      'unlabeled split (default: yes for '
                                      'imagenet_10pct, no otherwise).',
    },
    'output': {
        'out_dir': 'Directory to write the shards and manifest.json to.',
        'dataset': 'Name recorded in the manifest, which training matches '
                   'against --dataset (default: the split rule\'s name, or '
                   'the out_dir\'s base name for custom).',
        'shard_size': 'Records per TFRecord shard at most.',
        'overwrite': 'Replace a data set already prepared in --out_dir.',
    },
}

_ENUMS = {
    ('source', 'source'): (prepare_lib.SOURCES,
                           'Where the images come from: a prepared TFDS data '
                           'set, a folder of class sub-folders, or an .npz.'),
    ('split', 'split_rule'): (splits.SPLIT_RULES,
                              'How the splits are drawn: cifar10_4k, svhn_1k, '
                              'imagenet_10pct (the paper\'s), or custom.'),
    ('split', 'variant'): (splits.VARIANTS,
                           'cifar10_4k only: paper (balanced, by seed) or '
                           'released_code (first 4,000 labeled, all '
                           'unlabeled).'),
    ('output', 'normalization'): (prepare_lib.NORMALIZATIONS,
                                  'Mean/std in the manifest: auto (released '
                                  'constants for CIFAR-10/ImageNet, else '
                                  'computed), computed (labeled + unlabeled '
                                  'images), cifar10 or imagenet.'),
}

_TYPED_DEFINES = {
    'tfds_name': absl_flags.DEFINE_string,
    'tfds_data_dir': absl_flags.DEFINE_string,
    'tfds_train_split': absl_flags.DEFINE_string,
    'tfds_test_split': absl_flags.DEFINE_string,
    'train_dir': absl_flags.DEFINE_string,
    'test_dir': absl_flags.DEFINE_string,
    'npz_path': absl_flags.DEFINE_string,
    'seed': absl_flags.DEFINE_integer,
    'labeled_per_class': absl_flags.DEFINE_integer,
    'labeled_fraction': absl_flags.DEFINE_float,
    'validation_per_class': absl_flags.DEFINE_integer,
    'num_validation': absl_flags.DEFINE_integer,
    'num_test': absl_flags.DEFINE_integer,
    'unlabeled_includes_labeled': absl_flags.DEFINE_bool,
    'out_dir': absl_flags.DEFINE_string,
    'dataset': absl_flags.DEFINE_string,
    'shard_size': absl_flags.DEFINE_integer,
    'overwrite': absl_flags.DEFINE_bool,
}


def define(flag_values: absl_flags.FlagValues = absl_flags.FLAGS) -> None:
  """Declares every flag of the command on `flag_values`."""
  for (group, field), (choices, help_text) in _ENUMS.items():
    absl_flags.DEFINE_enum(field, getattr(_DEFAULTS, field), list(choices),
                           f'[{group}] {help_text}', flag_values=flag_values)
  for group, helps in _HELP.items():
    for field, help_text in helps.items():
      _TYPED_DEFINES[field](field, getattr(_DEFAULTS, field),
                            f'[{group}] {help_text}', flag_values=flag_values)


# The flags that name files or directories (read, or written: out_dir).
_PATH_FLAGS = ('tfds_data_dir', 'train_dir', 'test_dir', 'npz_path', 'out_dir')


def to_config(flag_values: absl_flags.FlagValues = absl_flags.FLAGS
              ) -> prepare_lib.PrepareConfig:
  """Reads the parsed flags once into a frozen, validated PrepareConfig.

  The command also refuses an --out_dir on ram://, which the library
  accepts: the prepared set would vanish with the process (ValueError);
  and a path flag whose scheme TensorFlow lacks or whose bucket cannot be
  reached, named before any work (storage.check_reachable).
  """
  config = prepare_lib.PrepareConfig(**{
      field.name: flag_values[field.name].value
      for field in dataclasses.fields(prepare_lib.PrepareConfig)})
  prepare_lib.validate(config)
  storage.check_outlives_process(config.out_dir, 'out_dir')
  for flag in _PATH_FLAGS:
    if getattr(config, flag):
      storage.check_reachable(getattr(config, flag), flag)
  return config


def _check_every_field_has_a_flag() -> None:
  named = {field for helps in _HELP.values() for field in helps}
  named |= {field for _, field in _ENUMS}
  for field in dataclasses.fields(prepare_lib.PrepareConfig):
    if field.name not in named or (
        field.name not in _TYPED_DEFINES and
        field.name not in {f for _, f in _ENUMS}):
      raise AssertionError(f'PrepareConfig.{field.name} has no flag')


_check_every_field_has_a_flag()
