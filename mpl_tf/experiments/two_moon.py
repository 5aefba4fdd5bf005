"""The paper's TwoMoon toy (section 3.1, Figure 2), run with the library.

    python -m mpl_tf.experiments.two_moon --output_dir=docs

Data: scikit-learn's make_moons, 1,000 points per class with Gaussian noise
`noise`; 3 points per class are labeled, the other 997 per class unlabeled
(the paper's [3 labeled, 997 unlabeled] x 2 classes), and a separate test set
of `test_points` points is drawn the same way. Every seed draws its own data,
labeled points and initial weights.

Network (both teacher and student, and the supervised model): 2 inputs ->
Dense(8, sigmoid) -> Dense(8, sigmoid) -> Dense(2) logits, 114 parameters:
the paper's "two fully connected layers of 8 units with sigmoid
non-linearity", plus the 2-way output layer any classifier needs.

Three methods, all with the same optimizer (the library's TF1 Nesterov
momentum, cosine-decayed rate, no weight decay) and step count:
  supervised     the network trained on the 6 labeled points (full batch).
  pseudo_labels  `MplStep` with mpl_weight=0: a teacher trained alongside on
                 the 6 labeled points only, whose pseudo labels teach the
                 student; the library's `--algorithm=pseudo_labels`.
  mpl            the same `MplStep` with mpl_weight=1: the teacher also gets
                 the student's feedback h (Algorithm 1 without UDA).
Pseudo labels and MPL differ in nothing but the feedback term, so their gap
is the effect of the feedback, which is what Figure 2 is about. There is no
augmentation here: both unlabeled views are the same points, uda_weight=0.

Writes `<output_dir>/results/two_moon.json` (every seed's test accuracy, the
mean and std) and `<output_dir>/figures/two_moon.png` (the three decision
boundaries of `figure_seed`, labeled points marked).
"""

import dataclasses
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from mpl_tf import experiments
from mpl_tf import losses
from mpl_tf import optim
from mpl_tf.config import MplConfig, OptimConfig
from mpl_tf.mpl_step import MplStep

METHODS = ('supervised', 'pseudo_labels', 'mpl')
NUM_CLASSES = 2
# Offset between a seed's training draw and its test draw of make_moons.
_TEST_SEED_OFFSET = 100_000


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
  num_seeds: int = 10
  first_seed: int = 0
  figure_seed: int = 0


@dataclasses.dataclass(frozen=True)
class TwoMoonData:
  x_labeled: np.ndarray     # [2 * labeled_per_class, 2] float32
  y_labeled: np.ndarray     # int32
  x_unlabeled: np.ndarray   # [2 * unlabeled_per_class, 2]
  y_unlabeled: np.ndarray   # kept for diagnostics only; never trained on
  x_test: np.ndarray
  y_test: np.ndarray


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
  half = config.test_points // 2
  x_test, y_test = datasets.make_moons(
      n_samples=(half, config.test_points - half), noise=config.noise,
      random_state=seed + _TEST_SEED_OFFSET)
  f32, i32 = (lambda a: a.astype(np.float32)), (lambda a: a.astype(np.int32))
  return TwoMoonData(f32(x[labeled]), i32(y[labeled]), f32(x[unlabeled]),
                     i32(y[unlabeled]), f32(x_test), i32(y_test))


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


def run_seed(config: TwoMoonConfig, seed: int) -> Dict[str, Any]:
  """The three methods on one seed's data; test accuracies and the models."""
  data = make_data(config, seed)
  supervised = train_supervised(config, data, seed)
  pl_student, pl_teacher, _ = train_mpl(config, data, seed,
                                        mpl_config(config, mpl_weight=0.0))
  mpl_student, mpl_teacher, diagnostics = train_mpl(config, data, seed,
                                                    mpl_config(config))
  return {
      'data': data,
      'models': {'supervised': supervised, 'pseudo_labels': pl_student,
                 'mpl': mpl_student},
      'test_accuracy': {
          'supervised': accuracy(supervised, data.x_test, data.y_test),
          'pseudo_labels': accuracy(pl_student, data.x_test, data.y_test),
          'mpl': accuracy(mpl_student, data.x_test, data.y_test)},
      'teacher_test_accuracy': {
          'pseudo_labels': accuracy(pl_teacher, data.x_test, data.y_test),
          'mpl': accuracy(mpl_teacher, data.x_test, data.y_test)},
      'mpl_feedback': diagnostics,
  }


def mean_std(values: List[float]) -> Dict[str, float]:
  """Mean and sample std (ddof=1; 0 for one value) of a list of numbers."""
  array = np.asarray(values, dtype=np.float64)
  std = float(np.std(array, ddof=1)) if len(array) > 1 else 0.0
  return {'mean': float(np.mean(array)), 'std': std, 'n': len(array)}


def plot_boundaries(seed_result: Dict[str, Any], path: str,
                    title_suffix: str = '') -> None:
  """Figure 2's three panels: each method's decision regions on one seed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  data = seed_result['data']
  x_all = np.concatenate([data.x_unlabeled, data.x_labeled])
  low, high = x_all.min(axis=0) - 0.5, x_all.max(axis=0) + 0.5
  grid_x, grid_y = np.meshgrid(np.linspace(low[0], high[0], 300),
                               np.linspace(low[1], high[1], 300))
  grid = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.float32)
  titles = {'supervised': 'Supervised', 'pseudo_labels': 'Pseudo Labels',
            'mpl': 'Meta Pseudo Labels'}
  figure, axes = pyplot.subplots(1, 3, figsize=(15, 4.6))
  for axis, method in zip(axes, METHODS):
    model = seed_result['models'][method]
    probs = tf.nn.softmax(model(grid, training=False)).numpy()[:, 1]
    axis.contourf(grid_x, grid_y, probs.reshape(grid_x.shape),
                  levels=np.linspace(0, 1, 11), cmap='RdBu_r', alpha=0.35)
    axis.contour(grid_x, grid_y, probs.reshape(grid_x.shape), levels=[0.5],
                 colors='k', linewidths=1.5)
    axis.scatter(data.x_unlabeled[:, 0], data.x_unlabeled[:, 1], s=3,
                 c='0.55', label='unlabeled')
    for label, color in ((0, 'tab:blue'), (1, 'tab:red')):
      points = data.x_labeled[data.y_labeled == label]
      axis.scatter(points[:, 0], points[:, 1], s=140, c=color, marker='*',
                   edgecolors='k', linewidths=1.0, label=f'labeled, class {label}')
    axis.set_title(f'{titles[method]}: test accuracy '
                   f'{seed_result["test_accuracy"][method]:.3f}')
    axis.set_xticks([])
    axis.set_yticks([])
  axes[0].legend(loc='lower left', fontsize=8)
  figure.suptitle('TwoMoon, 6 labeled + 1,994 unlabeled points' + title_suffix)
  figure.tight_layout()
  tf.io.gfile.makedirs(os.path.dirname(path) or '.')
  with tf.io.gfile.GFile(path, 'wb') as f:
    figure.savefig(f, format='png', dpi=90)
  pyplot.close(figure)


def run(config: TwoMoonConfig, output_dir: Optional[str] = None,
        log=print) -> Dict[str, Any]:
  """All seeds; writes the JSON and the figure under output_dir if given."""
  start = time.time()
  seeds = list(range(config.first_seed, config.first_seed + config.num_seeds))
  per_seed, figure_result = [], None
  for seed in seeds:
    seed_start = time.time()
    result = run_seed(config, seed)
    if seed == config.figure_seed or figure_result is None:
      figure_result = result   # the figure seed, else the first seed
    per_seed.append({'seed': seed, 'test_accuracy': result['test_accuracy'],
                     'teacher_test_accuracy': result['teacher_test_accuracy'],
                     'mpl_feedback': result['mpl_feedback']})
    log(f'seed {seed}: ' + ', '.join(
        f'{m} {result["test_accuracy"][m]:.4f}' for m in METHODS) +
        f' ({time.time() - seed_start:.1f} s)')
  summary = {m: mean_std([r['test_accuracy'][m] for r in per_seed])
             for m in METHODS}
  payload = {
      'config': dataclasses.asdict(config),
      'mpl_config': dataclasses.asdict(mpl_config(config)),
      'test_accuracy': summary,
      'teacher_test_accuracy': {
          m: mean_std([r['teacher_test_accuracy'][m] for r in per_seed])
          for m in ('pseudo_labels', 'mpl')},
      'mpl_wins': sum(r['test_accuracy']['mpl'] > max(
          r['test_accuracy']['supervised'], r['test_accuracy']['pseudo_labels'])
                      for r in per_seed),
      'per_seed': per_seed,
      'seconds': time.time() - start,
  }
  if output_dir:
    figure_path = os.path.join(output_dir, 'figures', 'two_moon.png')
    plot_boundaries(figure_result, figure_path,
                    f' (seed {config.figure_seed}, noise {config.noise})')
    json_path = os.path.join(output_dir, 'results', 'two_moon.json')
    payload['seconds'] = time.time() - start
    experiments.write_json(json_path, payload)
    log(f'wrote {json_path} and {figure_path}')
  for method in METHODS:
    log(f'{method:<14} test accuracy {summary[method]["mean"]:.4f} '
        f'+- {summary[method]["std"]:.4f} over {len(seeds)} seeds')
  log(f'total {payload["seconds"]:.0f} s')
  return payload


def main(argv):
  del argv
  from flags import experiment_flags  # pylint: disable=g-import-not-at-top
  config, output_dir = experiment_flags.two_moon_config()
  run(config, output_dir)


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from flags import experiment_flags  # pylint: disable=g-import-not-at-top
  experiment_flags.define_two_moon()
  app.run(main)
