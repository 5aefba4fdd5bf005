"""TwoMoon trainers that thousands of runs share: one compiled loop each.

The fair protocol (two_moon_protocol.py) trains every method hundreds of
times: each point of a rate grid, each step count, each seed. Building the
networks and tracing the library's step for every run would cost more than
the runs themselves (a 114-parameter network trains 1,000 steps in well
under a second once compiled). So a trainer is built once per method and
step count, and what changes between runs lives in variables:

* the peak learning rates (the library's WarmupCosine schedule scaled by a
  variable: `ScaledSchedule`), the augmentation noise and the run's seed;
* the data (labeled and unlabeled points, assigned per seed);
* the state (networks, optimizer slots and iterations, the step counter,
  the h baseline, the non-finite counters), put back to the values it had
  when the trainer was built, then the seed's initial weights.

The step itself is the library's: `MplStep` for every teacher-student
method (Pseudo Labels, MPL, UDA, UDA + MPL, all one step with different
`MplConfig`s, UDA through `losses.uda_consistency` inside it), the library's
optimizer, schedule and cross-entropy for the supervised models.

UDA for points: the "augmented" view of an unlabeled point is the point plus
Gaussian noise of std `noise_std`, drawn per step from (run seed, step): the
stand-in for RandAugment on images. The "original" view is the point.
With noise_std = 0 both views are the same points (the methods without UDA).
"""

import dataclasses
from typing import Dict, List

import keras
import numpy as np
import tensorflow as tf

from mpl_tf import losses
from mpl_tf import optim
from mpl_tf.config import MplConfig
from mpl_tf.experiments import two_moon as two_moon_lib
from mpl_tf.experiments.two_moon import TwoMoonConfig, TwoMoonData
from mpl_tf.mpl_step import MplStep


class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """peak * schedule(step): the library's schedule with a variable peak."""

  def __init__(self, schedule, peak: tf.Variable):
    self.schedule, self.peak = schedule, peak

  def __call__(self, step):
    return self.peak * self.schedule(step)


def _unit_schedules(config: TwoMoonConfig, num_steps: int):
  """The library's (teacher, student) schedules with peak 1 over num_steps."""
  optim_cfg = dataclasses.replace(two_moon_lib.optim_config(config),
                                  num_steps=num_steps, teacher_lr=1.0,
                                  student_lr=1.0)
  return optim_cfg, optim.learning_rates(optim_cfg)


class _Resettable:
  """Remembers its variables' values at build time; puts them back."""

  def _remember(self, variables: List[tf.Variable]) -> None:
    seen, self._state = set(), []
    for variable in variables:
      if id(variable) not in seen:
        seen.add(id(variable))
        self._state.append(variable)
    self._initial = [v.numpy() for v in self._state]

  def _reset(self) -> None:
    for variable, value in zip(self._state, self._initial):
      variable.assign(value)


def _initial_weights(config: TwoMoonConfig, seed: int) -> List[np.ndarray]:
  """two_moon.build_network's seeded initial weights (Glorot, zero bias)."""
  return two_moon_lib.build_network(config, seed, 'init').get_weights()


class MplTrainer(_Resettable):
  """Teacher and student trained by the library's MplStep, num_steps steps.

  Every run starts from the same state: the teacher's and the student's
  initial weights are those of two_moon.train_mpl for the seed (network
  seeds 2s and 2s+1), and the step's seed is the run's seed.
  """

  def __init__(self, config: TwoMoonConfig, mpl: MplConfig, num_steps: int,
               jit_compile: bool = True):
    self.config, self.mpl, self.num_steps = config, mpl, num_steps
    optim_cfg, (teacher_unit, student_unit) = _unit_schedules(config,
                                                              num_steps)
    self.teacher_peak = tf.Variable(1.0, name='teacher_peak')
    self.student_peak = tf.Variable(1.0, name='student_peak')
    self.noise_std = tf.Variable(0.0, name='noise_std')
    self.run_seed = tf.Variable(0, dtype=tf.int64, name='run_seed')
    per_class_labeled = config.labeled_per_class
    num_labeled = two_moon_lib.NUM_CLASSES * per_class_labeled
    num_unlabeled = two_moon_lib.NUM_CLASSES * config.unlabeled_per_class
    self.x_labeled = tf.Variable(tf.zeros([num_labeled, 2]))
    self.y_labeled = tf.Variable(tf.zeros([num_labeled], tf.int32))
    self.x_unlabeled = tf.Variable(tf.zeros([num_unlabeled, 2]))
    self.batch = config.unlabeled_batch or num_unlabeled
    self.teacher = two_moon_lib.build_network(config, 0, 'teacher')
    self.student = two_moon_lib.build_network(config, 1, 'student')
    self.step = MplStep(
        mpl, optim_cfg, self.teacher, self.student,
        optim.make_optimizer(ScaledSchedule(teacher_unit, self.teacher_peak),
                             optim_cfg, 'teacher_optimizer', self.teacher),
        optim.make_optimizer(ScaledSchedule(student_unit, self.student_peak),
                             optim_cfg, 'student_optimizer', self.student),
        global_labeled_batch=num_labeled, global_unlabeled_batch=self.batch,
        seed=self.run_seed)
    guard = self.step.guard
    self._remember(
        self.teacher.variables + self.student.variables +
        self.step.teacher_optimizer.variables +
        self.step.student_optimizer.variables +
        [self.step.step, self.step.baseline, guard.skipped_steps,
         guard.first_step, guard.first_terms])
    # A closure per trainer: TF's retracing warning counts traces per
    # Python function, and every trainer traces its own loop once.
    self._train = tf.function(lambda: self._train_loop(),
                              jit_compile=jit_compile)
    # The views as the loop draws them (XLA's normal draws differ from the
    # TF kernel's): what tests recompute the steps from.
    self.drawn_views = tf.function(lambda step: self.views(step),
                                   jit_compile=jit_compile)

  def views(self, step):
    """Step `step`'s unlabeled batch: (points, points + noise)."""
    # Philox explicitly, so that a seed means the same draws on any device.
    step = 2 * tf.cast(step, tf.int64)
    pick_seed = tf.stack([self.run_seed, step])
    noise_seed = tf.stack([self.run_seed, step + 1])
    if self.batch < self.x_unlabeled.shape[0]:
      # `batch` distinct points, drawn per step (with replacement across).
      scores = tf.random.stateless_uniform([self.x_unlabeled.shape[0]],
                                           pick_seed, alg='philox')
      points = tf.gather(self.x_unlabeled,
                         tf.math.top_k(scores, self.batch).indices)
    else:
      points = tf.convert_to_tensor(self.x_unlabeled)
    noise = tf.random.stateless_normal(tf.shape(points), noise_seed,
                                       alg='philox')
    return points, points + self.noise_std * noise

  def _train_loop(self):
    """num_steps MPL steps; returns the means of the feedback diagnostics."""
    sums = {'h_positive_fraction': 0.0, 'h_mean_abs': 0.0,
            'uda_mask_rate': 0.0}
    for i in tf.range(self.num_steps):
      original, augmented = self.views(i)
      metrics, _ = self.step({
          'labeled_images': self.x_labeled, 'labels': self.y_labeled,
          'unlabeled_images_ori': original,
          'unlabeled_images_aug': augmented})
      h = metrics['mpl/h']
      sums = {'h_positive_fraction': sums['h_positive_fraction'] +
                                     tf.cast(h > 0, tf.float32),
              'h_mean_abs': sums['h_mean_abs'] + tf.abs(h),
              'uda_mask_rate': sums['uda_mask_rate'] +
                               metrics['teacher/uda_mask_rate']}
    return {name: value / self.num_steps for name, value in sums.items()}

  def run(self, data: TwoMoonData, seed: int, teacher_lr: float,
          student_lr: float, noise_std: float = 0.0) -> Dict[str, float]:
    """Trains from the seed's initial state; returns the diagnostics."""
    self._reset()
    self.teacher.set_weights(_initial_weights(self.config, 2 * seed))
    self.student.set_weights(_initial_weights(self.config, 2 * seed + 1))
    self.x_labeled.assign(data.x_labeled)
    self.y_labeled.assign(data.y_labeled)
    self.x_unlabeled.assign(data.x_unlabeled)
    self.teacher_peak.assign(teacher_lr)
    self.student_peak.assign(student_lr)
    self.noise_std.assign(noise_std)
    self.run_seed.assign(seed)
    diagnostics = {k: float(v) for k, v in self._train().items()}
    # A rate too high for the network (the grid's top corner) diverges: the
    # guard records the first non-finite step; the run's accuracy says the
    # rest (the protocol selects by validation accuracy).
    diagnostics['nonfinite'] = bool(self.step.guard.first_step.numpy() >= 0)
    return diagnostics

  @property
  def models(self) -> Dict[str, keras.Model]:
    return {'student': self.student, 'teacher': self.teacher}


class SupervisedTrainer(_Resettable):
  """One network on `num_points` labeled points, full batch, num_steps.

  The optimizer, schedule and loss of two_moon.train_supervised (the
  teacher's rate: the supervised model sees the labels as the teacher
  does); the initial weights are the seed's (network seed s).
  """

  def __init__(self, config: TwoMoonConfig, num_points: int, num_steps: int,
               jit_compile: bool = True):
    self.config, self.num_steps = config, num_steps
    optim_cfg, (unit, _) = _unit_schedules(config, num_steps)
    self.peak = tf.Variable(1.0, name='peak')
    self.x = tf.Variable(tf.zeros([num_points, 2]))
    self.y = tf.Variable(tf.zeros([num_points], tf.int32))
    self.model = two_moon_lib.build_network(config, 0, 'supervised')
    self.optimizer = optim.make_optimizer(ScaledSchedule(unit, self.peak),
                                          optim_cfg, 'supervised', self.model)
    self._remember(self.model.variables + self.optimizer.variables)
    self._train = tf.function(lambda: self._train_loop(),
                              jit_compile=jit_compile)

  def _train_loop(self):
    variables = self.model.trainable_variables
    count = self.x.shape[0]
    for _ in tf.range(self.num_steps):
      with tf.GradientTape() as tape:
        logits = self.model(self.x, training=True)
        loss = losses.cross_entropy(losses.one_hot(self.y, logits), logits,
                                    count)
      grads = tape.gradient(loss, variables)
      self.optimizer.apply_gradients(zip(grads, variables))
    return tf.constant(0.0)

  def run(self, x: np.ndarray, y: np.ndarray, seed: int,
          learning_rate: float) -> Dict[str, float]:
    self._reset()
    self.model.set_weights(_initial_weights(self.config, seed))
    self.x.assign(x)
    self.y.assign(y)
    self.peak.assign(learning_rate)
    self._train()
    return {}

  @property
  def models(self) -> Dict[str, keras.Model]:
    return {'student': self.model}


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
  return two_moon_lib.accuracy(model, x, y)


def probabilities(model: keras.Model, points: np.ndarray) -> np.ndarray:
  """P(class 1) at `points`: what the figure draws."""
  return tf.nn.softmax(model(points, training=False)).numpy()[:, 1]
