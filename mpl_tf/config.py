"""Frozen, typed configuration for every part of an MPL run.

`flags/` is the only place that reads command-line flags; it builds one
`Config` from them, once, and the library takes that object (or one of its
parts) as an argument. Every disputed choice of the method (the kind of pseudo
label, how the teacher's feedback h is computed, its sign, the baseline, the
weight of the MPL term) is a field here, so it is logged with the run and
written to `model_dir/config.json`, never a constant hidden in the step.
Which configurations are refused is config_checks.py's `validate`.
"""

import dataclasses
import json
from typing import Any, Dict

PSEUDO_LABELS = ('sampled', 'argmax', 'soft')
FEEDBACKS = ('exact', 'taylor')
FEEDBACK_SIGNS = ('paper', 'released_code')
BASELINE_INITS = ('zero', 'uniform_sqrt3')
EMA_INITS = ('copy', 'released_code')
VIEWS = ('aug', 'ori')
TEACHER_ORIGINAL_PASSES = ('shared', 'no_grad')
RANDAUGMENT_OPS = ('paper', 'svhn', 'released_code')
CROPS = ('pad_crop', 'inception')
MODES = ('train', 'eval', 'export', 'predict')
ALGORITHMS = ('mpl', 'pseudo_labels', 'uda', 'supervised')
STRATEGIES = ('one_device', 'mirrored', 'multi_worker', 'tpu')
PRECISIONS = ('float32', 'mixed_bfloat16', 'mixed_float16')
BATCH_NORM_KERNELS = ('fused', 'keras')
OFFLINE_DATASETS = ('mnist5k', 'digits')
OPTIMIZERS = ('tf1_momentum', 'keras_sgd')
NONFINITE_POLICIES = ('stop', 'skip')
INPUT_SHARDINGS = ('files', 'global_batch')


class ConfigError(ValueError):
  """A configuration that cannot run; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the images come from and how the training views are made."""
  dataset: str = 'mnist5k'
  data_dir: str = 'data/mnist5k'
  # Offline data sets only: how the prepared splits are drawn (by seed).
  labeled_per_class: int = 10
  num_validation: int = 500
  num_test: int = 1000
  split_seed: int = 0
  image_size: int = 32
  # Digits are not mirror-symmetric; natural images (CIFAR, ImageNet) are.
  horizontal_flip: bool = True
  randaugment_layers: int = 2
  # The released code's RandAugment magnitude M (levels out of 10, so 16 is
  # beyond the usual range); see mpl_tf/data/randaugment_ops.py for the mapping.
  randaugment_magnitude: float = 16.0
  # Op list: 'paper' (Table 5, CIFAR-10/ImageNet), 'svhn' (Table 5, SVHN) or
  # 'released_code' (Cutout in place of SamplePairing).
  randaugment_ops: str = 'paper'
  # Pixels of TranslateX/Y, and half-side of RandAugment's own Cutout, at
  # level 10 (released code: 4 and 4 for CIFAR, 100 and 40 for ImageNet).
  randaugment_translate_const: float = 4.0
  randaugment_cutout_const: float = 4.0
  # Side of the extra Cutout square on the augmented view (0 = none; the
  # released code: 16 for CIFAR, none for ImageNet).
  cutout_size: int = 16
  # 'pad_crop': flip, pad by size/8 with 128, random crop (CIFAR, SVHN,
  # fixed-size images); 'inception': Inception-style random crop with a bicubic
  # resize, one crop shared by both unlabeled views (ImageNet).
  crop: str = 'pad_crop'
  # Evaluation of 'inception' data: centre crop of this fraction of the short
  # side, then a bicubic resize to image_size (224/256 as released).
  eval_crop_fraction: float = 0.875
  shuffle_seed: int = 0
  # How hosts share the training stream when there is more than one input
  # pipeline (multi-worker, TPU pod slices); one host is the same either way.
  # 'files': each host reads, decodes and augments its own share of each
  # split (the released code's per-host input; scales, but the batches
  # depend on the number of hosts): whole shards when they deal evenly, else
  # a contiguous range of records, so shares are balanced at any host count
  # (input_shares.py; the choice is printed). 'global_batch': every host
  # reads the one global stream and keeps its consecutive rows of each global
  # batch, so any layout trains on exactly the batches of one host, at the
  # cost of every host decoding and augmenting the whole global batch.
  input_sharding: str = 'files'


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The network used for both teacher and student (the paper uses one)."""
  name: str = 'wrn-28-2'
  dropout_rate: float = 0.2
  batch_norm_momentum: float = 0.99
  batch_norm_epsilon: float = 1e-3
  # Drop rate of the last residual block (EfficientNet's stochastic depth);
  # block i of n drops its residual branch with rate * i / n.
  stochastic_depth_rate: float = 0.0
  # 'float32', 'mixed_bfloat16' (TPU, recent CPUs) or 'mixed_float16' (GPU;
  # its losses are scaled, loss_scale.py); logits and batch norm stay float32.
  precision: str = 'float32'
  # Batch-norm statistics over the global batch under a distribution
  # strategy (the released code syncs them across replicas).
  sync_batch_norm: bool = True
  # How batch norm is computed, the same numbers either way (to float
  # rounding): 'fused' (TensorFlow's FusedBatchNormV3, so oneDNN/cuDNN's
  # fused kernels; Keras's path where it cannot be: synchronized over more
  # than one replica, models/fused_batch_norm.py) or 'keras' (Keras 3's
  # layer: separate moment and normalisation ops everywhere).
  batch_norm_kernel: str = 'fused'


def _choice(default, description: str, choices=None):
  """A field described once: its flag's help is this description.

  `choices` makes the flag an enum; `validate` checks them too.
  """
  metadata = {'description': description}
  if choices is not None:
    metadata['choices'] = choices
  return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class MplConfig:
  """The disputed choices of Meta Pseudo Labels, each one a field.

  Defaults follow the paper's Algorithm 1; `flags/released_code_step.cfg`
  sets the released TPU code's values. Each field's description below is
  the only one in the project: `flags/definitions.py` makes it the flag's
  help (`python main.py --helpfull`), and the docs link here.
  """
  pseudo_label: str = _choice(
      'sampled', 'How the pseudo label y_hat is drawn from the teacher\'s '
      'distribution T(x_u): sampled (Algorithm 1: y_hat ~ T(x_u), drawn per '
      'row of the global batch), argmax (hard), or soft (released code: the '
      'distribution itself, which makes the MPL term CE(stop_grad(softmax(z)), '
      'z) and its teacher gradient exactly zero).', PSEUDO_LABELS)
  feedback: str = _choice(
      'exact', 'How the teacher\'s feedback h is computed: exact (Algorithm 1, '
      'Equation 12: h = eta_S * grad L_l(theta_S\')^T grad CE(y_hat, '
      'S(x_u; theta_S)), with eta_S the student\'s current rate and the raw '
      'gradient of its pseudo-label loss, before weight decay and clipping) '
      'or taylor (released code: the change of the student\'s labeled loss '
      'across its update, equal to first order).', FEEDBACKS)
  feedback_sign: str = _choice(
      'paper', 'Sign of h: paper (h > 0 when the student\'s update lowered '
      'its labeled loss; Taylor: L_l(old) - L_l(new)) or released_code (the '
      'opposite: new - old).', FEEDBACK_SIGNS)
  baseline_decay: float = _choice(
      0.0, 'Decay of a moving average of h that is subtracted from it, moved '
      'first and then subtracted as released; 0 = no baseline (Algorithm 1; '
      'the released code uses 0.99).')
  baseline_init: str = _choice(
      'zero', 'Initial value of that moving average: zero, or uniform_sqrt3 '
      '(a draw from U(-sqrt3, sqrt3), as the released code).', BASELINE_INITS)
  ema_init: str = _choice(
      'copy', 'Initial value of the EMA student (of the UDA network under '
      'algorithm=uda), set once when it is created (a resumed run restores '
      'its checkpointed values): copy (the student\'s weights) or '
      'released_code (common_utils.setup_ema: 0, or 1 for variables whose '
      'released name contains "variance" or "beta", which are the batch-norm '
      'moving variances and offsets; every other weight, batch-norm scales '
      'and moving means included, starts at 0). The decay\'s warm-up '
      'min(decay, (t+1)/(t+10)) keeps at most 0.1, 0.018 and 0.0045 of the '
      'start after steps 1, 2 and 3 (exactly that for ema_decay >= 0.25).',
      EMA_INITS)
  freeze_teacher_batch_norm_statistics: bool = _choice(
      False, 'Leave the teacher\'s batch-norm moving mean and variance at '
      'their values during MPL steps: its passes still normalise with their '
      'batch statistics, but the moving ones (used only to evaluate the '
      'teacher, which then uses their initial values) stay where they are, '
      'as in the released code, whose update ops are only the student\'s '
      '(training_utils.MPL.step_fn). Off: each step moves them once, by the '
      'teacher\'s training pass.')
  mpl_weight: float = _choice(
      1.0, 'Weight of the MPL term h * CE(y_hat, T(x_u)) in the teacher\'s '
      'loss; 0 = the UDA-only teacher (ablation).')
  student_view: str = _choice(
      'aug', 'Which unlabeled view the pseudo label is read from and the '
      'student is trained on: aug (RandAugment(x_u), as released) or ori. '
      'Algorithm 1 says x_u.', VIEWS)
  teacher_original_pass: str = _choice(
      'shared', 'How the teacher sees the original view x_u, whose logits are '
      'only the (stop-gradient) UDA target: shared (Algorithm 1 as released: '
      'in its one forward and backward pass on [x_l; x_u; RandAugment(x_u)]) '
      'or no_grad (a separate forward pass without backward: a third less '
      'teacher backward, but other batch-norm batches, so other numbers; '
      'needs student_view=aug). Measured in docs/performance.md.',
      TEACHER_ORIGINAL_PASSES)
  rematerialize_teacher: bool = _choice(
      False, 'Memory, not numbers: run the teacher\'s forward pass twice, '
      'first untaped for the pseudo labels, then taped after h, with its '
      'dropout RNG and batch-norm statistics restored in between so both '
      'compute the same logits. Its activations then do not live through the '
      'student\'s step (less peak memory) for one more teacher forward '
      '(+21% FLOPs at mu=7; measured in docs/performance.md).')
  microbatches: int = _choice(
      1, 'Each replica runs its batch as this many equal chunks in turn and '
      'updates once, as this many times the replicas would (batch-norm '
      'statistics and dropout masks per chunk), in one chunk\'s activation '
      'memory; every step. Above 1: --nosync_batch_norm, and it must divide '
      'each replica\'s labeled batch. Measured in docs/performance.md.')
  label_smoothing: float = _choice(
      0.0, 'Label smoothing of the teacher\'s supervised loss and of the '
      'student\'s loss on the pseudo labels (the released code uses one '
      'value for both).')
  uda_weight: float = _choice(
      1.0, 'Final weight of the teacher\'s UDA loss (reached after '
      'uda_steps).')
  uda_temperature: float = _choice(
      0.7, 'Sharpening temperature of the UDA target softmax(T(x_u) / T).')
  uda_threshold: float = _choice(
      0.6, 'UDA mask: examples whose sharpened target\'s top probability is '
      'below this are left out of the UDA loss.')
  uda_steps: int = _choice(
      1, 'Steps of the linear ramp of the UDA weight from 0 to uda_weight.')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Batches, learning rates and schedules of both networks."""
  labeled_batch_size: int = 16   # global B
  uda_ratio: int = 4             # mu: the unlabeled batch is B * mu per view
  num_steps: int = 1000
  teacher_lr: float = 0.05
  student_lr: float = 0.05
  # The released code multiplies both rates by labeled_batch_size / 256.
  scale_lr_by_batch: bool = False
  # 'tf1_momentum': the released code's TF1 MomentumOptimizer (the
  # accumulator excludes the rate) with coupled L2 g + wd * w added to the
  # summed gradients; 'keras_sgd': Keras's SGD (the velocity includes the
  # rate) with its decoupled decay w <- w - lr * wd * w instead.
  optimizer: str = 'tf1_momentum'
  momentum: float = 0.9
  nesterov: bool = True
  # On all non-batch-norm weights, dense biases included; coupled or
  # decoupled as `optimizer` says.
  weight_decay: float = 5e-4
  grad_clip_norm: float = 1e9
  teacher_warmup_steps: int = 0
  student_wait_steps: int = 0
  student_warmup_steps: int = 0
  ema_decay: float = 0.0         # 0 = the EMA student equals the student


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What main.py does, and what the loop does around the step."""
  # 'train' (resumes from model_dir), 'eval' (a checkpoint or SavedModel),
  # 'export' (SavedModel of the EMA student), 'predict' (image files).
  mode: str = 'train'
  # What 'train' trains: 'mpl' (teacher, student and EMA student),
  # 'pseudo_labels' (the same step without feedback or UDA: needs
  # mpl_weight=0 and uda_weight=0), 'uda' (one network with UDA) or
  # 'supervised' (the labeled images alone); all share data, schedules, seed.
  algorithm: str = 'mpl'
  model_dir: str = 'runs/demo'
  seed: int = 0
  # 'one_device', 'mirrored', 'multi_worker' or 'tpu' (see distribute.py).
  strategy: str = 'one_device'
  tpu: str = ''                  # TPU name for strategy=tpu ('' = local)
  # multi_worker: seconds a worker waits for every other worker of
  # TF_CONFIG to start before it stops, naming the missing ones.
  cluster_start_timeout: int = 600
  # Steps run on the device per host call (one tf.function with tf.range),
  # like the released code's save_every; logs and summaries follow each.
  steps_per_loop: int = 50
  # A device loop runs as calls of at most this many steps, with a check for
  # a stop request (SIGTERM) between them: a stop is honoured within this
  # many steps, whatever steps_per_loop is (0 = only between device loops).
  stop_check_steps: int = 100
  checkpoint_every: int = 500    # a multiple of steps_per_loop
  keep_checkpoints: int = 3
  jit_compile: bool = False      # XLA for the replica step (TPU: always)
  eval_every: int = 0            # a multiple of steps_per_loop; 0 = at the end
  eval_batch_size: int = 250     # global
  eval_median_last: int = 5      # report the median of the last k evals
  # Also the teacher's, student's, finetuned student's and supervised
  # baseline's validation top-1 at every evaluation (curves.png), not only
  # the EMA student's: more evaluation time, no effect on training.
  eval_all_networks: bool = False
  # Train a supervised-only model on the same labeled images in the same run.
  supervised_baseline: bool = True
  supervised_steps: int = 0      # 0 = as many steps as the MPL run
  export_dir: str = ''           # '' = model_dir/export/1 (a version dir)
  # eval/export: a checkpoint prefix, a SavedModel dir (eval), or '' = the
  # best-on-validation EMA student of model_dir, else its latest checkpoint.
  checkpoint: str = ''
  predict_files: str = ''        # predict: comma-separated files or globs
  # A NaN or Inf in a loss or gradient norm: 'stop' ends the run naming the
  # step and the term, keeping the last (finite) checkpoint; 'skip' leaves
  # every network and optimizer slot as before that step, counts it
  # (health/skipped_steps) and goes on. See docs/reliability.md.
  nonfinite: str = 'stop'
  # Under 'skip': this many non-finite steps in a row stop the run, since
  # the state they all start from is then broken (e.g. weights grown so large
  # by one finite but huge update that every forward pass overflows) and
  # skipping would finish the run with networks that output NaN.
  nonfinite_skip_limit: int = 20
  # tf.config.experimental.enable_op_determinism(): bitwise-reproducible
  # runs and resumes on CPU, at some speed (docs/reliability.md).
  deterministic: bool = False


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """The stage after MPL: the student trained on the labeled images alone.

  The paper's reported numbers are after it; the released code has none.
  It starts from the EMA student and is reported beside the un-finetuned one.
  """
  steps: int = 0                 # 0 = no finetuning
  learning_rate: float = 3e-5
  batch_size: int = 0            # 0 = labeled_batch_size
  weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class Config:
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  mpl: MplConfig = MplConfig()
  optim: OptimConfig = OptimConfig()
  run: RunConfig = RunConfig()
  finetune: FinetuneConfig = FinetuneConfig()

  @property
  def unlabeled_batch_size(self) -> int:
    """Global unlabeled batch per view (B * mu)."""
    return self.optim.labeled_batch_size * self.optim.uda_ratio

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  def summary(self) -> str:
    """Data, network, algorithm and the MPL choices, in two lines.

    What the console shows; the whole configuration is config.json.
    """
    data, optim, run, mpl = self.data, self.optim, self.run, self.mpl
    stages = [f'{optim.num_steps} steps']
    if self.finetune.steps:
      stages.append(f'finetune {self.finetune.steps} steps')
    if run.supervised_baseline and run.algorithm != 'supervised':
      stages.append('supervised baseline')
    first = (f'{run.mode} {run.algorithm}: {data.dataset} '
             f'({data.image_size}x{data.image_size}, {data.data_dir}), '
             f'{self.model.name}, B={optim.labeled_batch_size} '
             f'mu={optim.uda_ratio} microbatches={mpl.microbatches}, '
             f'{", ".join(stages)}, {run.strategy}; '
             f'model_dir {run.model_dir}')
    if run.algorithm not in ('mpl', 'pseudo_labels', 'uda'):
      return first
    baseline = (f'baseline {mpl.baseline_decay} ({mpl.baseline_init})'
                if mpl.baseline_decay else 'no baseline')
    teacher_statistics = ('frozen' if mpl.freeze_teacher_batch_norm_statistics
                          else 'moving')
    second = (f'  MPL: pseudo_label={mpl.pseudo_label} '
              f'feedback={mpl.feedback} sign={mpl.feedback_sign} '
              f'{baseline} mpl_weight={mpl.mpl_weight} '
              f'student_view={mpl.student_view} ema_init={mpl.ema_init} '
              f'teacher_bn_statistics={teacher_statistics}; UDA weight '
              f'{mpl.uda_weight} T={mpl.uda_temperature} threshold '
              f'{mpl.uda_threshold}')
    return f'{first}\n{second}'


