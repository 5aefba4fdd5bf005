"""The paper's TwoMoon toy (section 3.1, Figure 2), run with the library.

    python experiment.py two_moon --output_dir=docs

Data: scikit-learn's make_moons, 1,000 points per class with Gaussian noise
`noise`; 3 points per class are labeled, the other 997 per class unlabeled
(the paper's [3 labeled, 997 unlabeled] x 2 classes), and a separate test set
of `test_points` points is drawn the same way. Every seed draws its own data,
labeled points and initial weights.

Network (both teacher and student, and the supervised model): 2 inputs ->
Dense(8, sigmoid) -> Dense(8, sigmoid) -> Dense(2) logits, 114 parameters:
the paper's "two fully connected layers of 8 units with sigmoid
non-linearity", plus the 2-way output layer any classifier needs.

Every method uses the same optimizer (the library's TF1 Nesterov momentum,
cosine-decayed rate, no weight decay). This module holds the pieces: the
data, the network, one supervised run and one MplStep run (`train_mpl`, used
by the ablation and by two_moon_tuning.py, the grid of the feedback without
UDA). The command runs the fair protocol of two_moon_protocol.py (every
method, Algorithm 1 with UDA and its control, tuned alike) and writes
`<output_dir>/results/two_moon.json` and `<output_dir>/figures/two_moon.png`.
"""

import dataclasses
import os
from typing import Dict, List, Tuple

import keras
import numpy as np
import tensorflow as tf

from mpl_tf import losses
from mpl_tf import optim
from mpl_tf.config import ConfigError, MplConfig, OptimConfig
from mpl_tf.experiments import checks
from mpl_tf.mpl_step import MplStep

NUM_CLASSES = 2
# Offset between a seed's training draw and its test draw of make_moons.
TEST_SEED_OFFSET = 100_000


@dataclasses.dataclass(frozen=True)
class TwoMoonConfig:
  """Everything that decides a TwoMoon run; flags/experiment_flags.py fills it."""
  noise: float = 0.1
  labeled_per_class: int = 3
  unlabeled_per_class: int = 997
  test_points: int = 2000
  hidden_units: int = 8
  num_steps: int = 1000
  mpl_weight: float = 1.0
  # Peak rates of the cosine schedules: the supervised model and the teacher
  # share `teacher_lr`, so supervised and teacher see the labels alike.
  teacher_lr: float = 0.5
  student_lr: float = 0.5
  momentum: float = 0.9
  # Unlabeled points per step (sampled with replacement across steps);
  # 0 = all 1,994 every step.
  unlabeled_batch: int = 64
  # MplConfig fields of the MPL run (Algorithm 1 by default).
  pseudo_label: str = 'sampled'
  feedback: str = 'exact'
  feedback_sign: str = 'paper'
  # The first of the seeds a caller runs (two_moon_tuning: --tuning_seeds).
  first_seed: int = 0

  def check(self) -> None:
    """Refuses a value no run can use, naming its flag (checks.py: why)."""
    checks.at_least('noise', self.noise, 0, "the std of make_moons' Gaussian "
                    'noise')
    checks.at_least('labeled_per_class', self.labeled_per_class, 1,
                    'labeled points per class')
    checks.at_least('unlabeled_per_class', self.unlabeled_per_class, 1,
                    'unlabeled points per class')
    checks.at_least('test_points', self.test_points, 2,
                    'held-out test points, one per class at least')
    checks.at_least('hidden_units', self.hidden_units, 1,
                    'units of each hidden layer')
    checks.at_least('num_steps', self.num_steps, 1, 'training steps')
    checks.at_least('mpl_weight', self.mpl_weight, 0,
                    'weight of the MPL term; 0: no feedback')
    checks.positive('teacher_lr', self.teacher_lr,
                    'peak rate of the teacher and the supervised model')
    checks.positive('student_lr', self.student_lr, 'peak rate of the student')
    checks.below_one('momentum', self.momentum,
                     'Nesterov momentum; 0: plain SGD')
    checks.at_least('unlabeled_batch', self.unlabeled_batch, 0,
                    'unlabeled points per step; 0: all of them')
    unlabeled = NUM_CLASSES * self.unlabeled_per_class
    if self.unlabeled_batch > unlabeled:
      raise ConfigError(
          f'--unlabeled_batch={self.unlabeled_batch}: more than the '
          f'{unlabeled} unlabeled points (2 x --unlabeled_per_class); pass '
          f'at most {unlabeled}, or 0 for all of them.')
    checks.seeds('first_seed', self.first_seed, 1, TEST_SEED_OFFSET)


@dataclasses.dataclass(frozen=True)
class TwoMoonData:
  x_labeled: np.ndarray     # [2 * labeled_per_class, 2] float32
  y_labeled: np.ndarray     # int32
  x_unlabeled: np.ndarray   # [2 * unlabeled_per_class, 2]
  y_unlabeled: np.ndarray   # kept for diagnostics only; never trained on
  x_test: np.ndarray
  y_test: np.ndarray


def make_moons(num_points: int, noise: float, seed: int):
  """(x float32 [n, 2], y int32 [n]): sklearn's moons, classes balanced."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  half = num_points // 2
  x, y = datasets.make_moons(n_samples=(half, num_points - half),
                             noise=noise, random_state=seed)
  return x.astype(np.float32), y.astype(np.int32)


def make_data(config: TwoMoonConfig, seed: int) -> TwoMoonData:
  """One seed's labeled, unlabeled and test points (classes balanced)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  per_class = config.labeled_per_class + config.unlabeled_per_class
  x, y = datasets.make_moons(n_samples=(per_class, per_class),
                             noise=config.noise, random_state=seed)
  rng = np.random.default_rng(seed)
  labeled = np.concatenate([
      rng.choice(np.flatnonzero(y == c), config.labeled_per_class,
                 replace=False) for c in range(NUM_CLASSES)])
  unlabeled = np.setdiff1d(np.arange(len(y)), labeled)
  x_test, y_test = make_moons(config.test_points, config.noise,
                              seed + TEST_SEED_OFFSET)
  f32, i32 = (lambda a: a.astype(np.float32)), (lambda a: a.astype(np.int32))
  return TwoMoonData(f32(x[labeled]), i32(y[labeled]), f32(x[unlabeled]),
                     i32(y[unlabeled]), x_test, y_test)


def build_network(config: TwoMoonConfig, seed: int, name: str) -> keras.Model:
  """2 -> 8 sigmoid -> 8 sigmoid -> 2 logits (Glorot-uniform, zero biases)."""
  init = lambda offset: keras.initializers.GlorotUniform(seed=seed * 10 + offset)
  inputs = keras.Input((2,), name='points')
  hidden = keras.layers.Dense(config.hidden_units, activation='sigmoid',
                              kernel_initializer=init(0), name='fc1')(inputs)
  hidden = keras.layers.Dense(config.hidden_units, activation='sigmoid',
                              kernel_initializer=init(1), name='fc2')(hidden)
  logits = keras.layers.Dense(NUM_CLASSES, kernel_initializer=init(2),
                              name='logits')(hidden)
  return keras.Model(inputs, logits, name=name)


def optim_config(config: TwoMoonConfig) -> OptimConfig:
  """The library's released-code optimizer, without weight decay."""
  return OptimConfig(labeled_batch_size=2 * config.labeled_per_class,
                     num_steps=config.num_steps, teacher_lr=config.teacher_lr,
                     student_lr=config.student_lr, momentum=config.momentum,
                     nesterov=config.momentum > 0, weight_decay=0.0,
                     optimizer='tf1_momentum')


def mpl_config(config: TwoMoonConfig, **overrides) -> MplConfig:
  """Algorithm 1 as `config` sets it, without UDA; `overrides` win."""
  fields = dict(pseudo_label=config.pseudo_label, feedback=config.feedback,
                feedback_sign=config.feedback_sign, uda_weight=0.0,
                label_smoothing=0.0, mpl_weight=config.mpl_weight)
  fields.update(overrides)
  return MplConfig(**fields)


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
  predictions = np.argmax(model(x, training=False).numpy(), axis=-1)
  return float(np.mean(predictions == y))


def train_supervised(config: TwoMoonConfig, data: TwoMoonData,
                     seed: int) -> keras.Model:
  """The network on the labeled points alone, full batch, `num_steps` steps."""
  model = build_network(config, seed, 'supervised')
  optim_cfg = optim_config(config)
  teacher_lr, _ = optim.learning_rates(optim_cfg)
  optimizer = optim.make_optimizer(teacher_lr, optim_cfg, 'supervised', model)
  x, y = tf.constant(data.x_labeled), tf.constant(data.y_labeled)

  @tf.function
  def train_loop():
    for _ in tf.range(config.num_steps):
      with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = losses.cross_entropy(losses.one_hot(y, logits), logits,
                                    len(data.y_labeled))
      grads = tape.gradient(loss, model.trainable_variables)
      optimizer.apply_gradients(zip(grads, model.trainable_variables))

  train_loop()
  return model


def unlabeled_indices(config: TwoMoonConfig, num_unlabeled: int,
                      seed: int) -> np.ndarray:
  """[num_steps, batch] rows of the unlabeled set each step trains on."""
  if not config.unlabeled_batch:
    return np.tile(np.arange(num_unlabeled, dtype=np.int32),
                   (config.num_steps, 1))
  rng = np.random.default_rng(seed + 1)
  return np.stack([rng.choice(num_unlabeled, config.unlabeled_batch,
                              replace=False).astype(np.int32)
                   for _ in range(config.num_steps)])


def train_mpl(config: TwoMoonConfig, data: TwoMoonData, seed: int,
              mpl: MplConfig) -> Tuple[keras.Model, keras.Model,
                                       Dict[str, float]]:
  """Teacher and student trained by the library's MplStep for num_steps.

  The labeled batch is all labeled points every step; the unlabeled batch is
  `unlabeled_batch` points drawn per step. Teacher and student start from
  different initial weights (seeds 2s and 2s+1 of the network's initializer).

  Returns:
    (student, teacher, diagnostics): the fraction of steps with h > 0 and
    the mean |h|, for reading what the feedback did.
  """
  optim_cfg = optim_config(config)
  teacher = build_network(config, 2 * seed, 'teacher')
  student = build_network(config, 2 * seed + 1, 'student')
  teacher_lr, student_lr = optim.learning_rates(optim_cfg)
  indices = unlabeled_indices(config, len(data.y_unlabeled), seed)
  step = MplStep(
      mpl, optim_cfg, teacher, student,
      optim.make_optimizer(teacher_lr, optim_cfg, 'teacher_optimizer', teacher),
      optim.make_optimizer(student_lr, optim_cfg, 'student_optimizer', student),
      global_labeled_batch=len(data.y_labeled),
      global_unlabeled_batch=indices.shape[1], seed=seed)
  x_labeled, y_labeled = tf.constant(data.x_labeled), tf.constant(data.y_labeled)
  x_unlabeled = tf.constant(data.x_unlabeled)

  @tf.function
  def train_loop(all_indices):
    h_positive = tf.constant(0.0)
    h_magnitude = tf.constant(0.0)
    for i in tf.range(tf.shape(all_indices)[0]):
      points = tf.gather(x_unlabeled, all_indices[i])
      metrics, _ = step({'labeled_images': x_labeled, 'labels': y_labeled,
                         'unlabeled_images_ori': points,
                         'unlabeled_images_aug': points})
      h_positive += tf.cast(metrics['mpl/h'] > 0, tf.float32)
      h_magnitude += tf.abs(metrics['mpl/h'])
    steps = tf.cast(tf.shape(all_indices)[0], tf.float32)
    return h_positive / steps, h_magnitude / steps

  h_positive, h_magnitude = train_loop(tf.constant(indices))
  return student, teacher, {'h_positive_fraction': float(h_positive),
                            'h_mean_abs': float(h_magnitude)}


def mean_std(values: List[float]) -> Dict[str, float]:
  """Mean and sample std (ddof=1; 0 for one value) of a list of numbers."""
  array = np.asarray(values, dtype=np.float64)
  std = float(np.std(array, ddof=1)) if len(array) > 1 else 0.0
  return {'mean': float(np.mean(array)), 'std': std, 'n': len(array)}


@dataclasses.dataclass(frozen=True)
class Panel:
  """One method's decision regions: P(class 1) on the figure's grid."""
  title: str
  test_accuracy: float
  probabilities: np.ndarray


def figure_grid(data: TwoMoonData, size: int = 300):
  """(points [size*size, 2], grid shape): the plane around the data."""
  x_all = np.concatenate([data.x_unlabeled, data.x_labeled])
  low, high = x_all.min(axis=0) - 0.5, x_all.max(axis=0) + 0.5
  grid_x, grid_y = np.meshgrid(np.linspace(low[0], high[0], size),
                               np.linspace(low[1], high[1], size))
  points = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
  return points.astype(np.float32), grid_x.shape


def plot_panels(data: TwoMoonData, panels: List[Panel], path: str,
                title: str) -> None:
  """Figure 2's panels: each method's decision regions on one seed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  points, shape = figure_grid(data)
  grid_x, grid_y = points[:, 0].reshape(shape), points[:, 1].reshape(shape)
  figure, axes = pyplot.subplots(1, len(panels),
                                 figsize=(4.2 * len(panels), 4.4))
  for axis, panel in zip(np.atleast_1d(axes), panels):
    axis.contourf(grid_x, grid_y, panel.probabilities,
                  levels=np.linspace(0, 1, 11), cmap='RdBu_r', alpha=0.35)
    axis.contour(grid_x, grid_y, panel.probabilities, levels=[0.5],
                 colors='k', linewidths=1.5)
    axis.scatter(data.x_unlabeled[:, 0], data.x_unlabeled[:, 1], s=3,
                 c='0.55', label='unlabeled')
    for label, color in ((0, 'tab:blue'), (1, 'tab:red')):
      labeled = data.x_labeled[data.y_labeled == label]
      axis.scatter(labeled[:, 0], labeled[:, 1], s=140, c=color, marker='*',
                   edgecolors='k', linewidths=1.0,
                   label=f'labeled, class {label}')
    axis.set_title(f'{panel.title}\ntest accuracy {panel.test_accuracy:.3f}',
                   fontsize=10)
    axis.set_xticks([])
    axis.set_yticks([])
  np.atleast_1d(axes)[0].legend(loc='lower left', fontsize=7)
  figure.suptitle(title)
  figure.tight_layout()
  tf.io.gfile.makedirs(os.path.dirname(path) or '.')
  with tf.io.gfile.GFile(path, 'wb') as f:
    figure.savefig(f, format='png', dpi=80)
  pyplot.close(figure)
