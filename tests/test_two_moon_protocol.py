"""TwoMoon's fair protocol: UDA for points through the library, tiny runs.

The UDA path is checked against an independent computation: the teacher's
first update, recomputed here with plain TensorFlow ops (not the library's
losses) from the batch the trainer drew. It fails if the augmented view is
the original one, or if the UDA weight is ignored.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf

from mpl_tf.config import MplConfig
from mpl_tf.experiments import report
from mpl_tf.experiments import two_moon
from mpl_tf.experiments import two_moon_protocol as protocol_lib
from mpl_tf.experiments import two_moon_trainers as trainers

MOONS = two_moon.TwoMoonConfig(unlabeled_batch=16, test_points=100)


def _independent_teacher(config, data, weights, views, uda_weight,
                         temperature, threshold, peak_lr):
  """The teacher after len(views) steps with mpl_weight=0: plain TF ops.

  Supervised CE plus uda_weight * (the UDA loss, ramped as min(1, t / 1):
  0 at step 0), TF1 Nesterov momentum, cosine rate; none of the library's
  losses or optimizers.
  """
  teacher = two_moon.build_network(config, 0, 'independent')
  teacher.set_weights(weights)
  variables = teacher.trainable_variables
  accumulators = [tf.zeros_like(v) for v in variables]
  num_steps = len(views)
  for step, (original, augmented) in enumerate(views):
    with tf.GradientTape() as tape:
      onehot = tf.one_hot(data.y_labeled, 2)
      supervised = -tf.reduce_mean(tf.reduce_sum(
          onehot * tf.nn.log_softmax(teacher(data.x_labeled)), -1))
      target = tf.nn.softmax(teacher(original) / temperature)
      mask = tf.cast(tf.reduce_max(target, -1) >= threshold, tf.float32)
      per_point = -tf.reduce_sum(tf.stop_gradient(target) *
                                 tf.nn.log_softmax(teacher(augmented)), -1)
      uda = tf.reduce_sum(per_point * mask) / original.shape[0]
      loss = supervised + uda_weight * min(1.0, step / 1.0) * uda
    grads = tape.gradient(loss, variables)
    lr = peak_lr * 0.5 * (1 + np.cos(np.pi * step / num_steps))
    momentum = config.momentum
    for index, (variable, grad) in enumerate(zip(variables, grads)):
      accumulators[index] = momentum * accumulators[index] + grad
      variable.assign_sub(lr * (grad + momentum * accumulators[index]))
  return [v.numpy() for v in variables]


class UdaForPointsTest(tf.test.TestCase):

  def _check_teacher(self, uda_weight, jit_compile):
    mpl = MplConfig(mpl_weight=0.0, uda_weight=uda_weight,
                    uda_temperature=0.4, uda_threshold=0.6, uda_steps=1,
                    label_smoothing=0.0)
    trainer = trainers.MplTrainer(MOONS, mpl, num_steps=3,
                                  jit_compile=jit_compile)
    data = two_moon.make_data(MOONS, seed=3)
    trainer.run(data, seed=3, teacher_lr=0.5, student_lr=0.5, noise_std=0.2)
    views = [trainer.drawn_views(step) for step in range(3)]   # the batches
    expected = _independent_teacher(
        MOONS, data, trainers._initial_weights(MOONS, 2 * 3), views,
        uda_weight, 0.4, 0.6, 0.5)
    for variable, value in zip(trainer.teacher.trainable_variables, expected):
      self.assertAllClose(variable.numpy(), value, atol=2e-6,
                          msg=f'uda_weight={uda_weight} jit={jit_compile}')
    return trainer

  def test_views_are_points_and_points_plus_noise(self):
    trainer = self._check_teacher(4.0, jit_compile=False)
    data = two_moon.make_data(MOONS, seed=3)
    rows = {tuple(p) for p in data.x_unlabeled}
    original, augmented = trainer.views(0)
    self.assertTrue(all(tuple(p) in rows for p in original.numpy()))
    noise = (augmented - original).numpy()
    self.assertEqual(noise.shape, (16, 2))
    self.assertBetween(float(np.std(noise)), 0.1, 0.3)   # std 0.2, 32 draws
    self.assertNotAllClose(trainer.views(1)[0], original)   # a new batch
    trainer.noise_std.assign(0.0)
    same_original, same_augmented = trainer.views(0)
    self.assertAllEqual(same_original, same_augmented)

  def test_teacher_learns_supervised_plus_weighted_uda_traced_and_xla(self):
    self._check_teacher(0.0, jit_compile=False)
    self._check_teacher(4.0, jit_compile=True)


TINY = protocol_lib.ProtocolConfig(
    two_moon=MOONS, validation_points=100, rate_grid=(0.5,),
    supervised_rate_grid=(0.5,), noise_grid=(0.1,), step_counts=(3,),
    tuning_seeds=1, eval_seeds=1, convergence_factor=2, jit_compile=False,
    processes=1)


class ProtocolTest(tf.test.TestCase):

  def test_every_method_gets_the_same_number_of_rate_settings(self):
    config = protocol_lib.ProtocolConfig()
    sizes = {}
    for method in protocol_lib.METHODS:
      grid = protocol_lib.settings(config, method)
      noises = len(config.noise_grid) if method.noise else 1
      sizes[method.name] = len(grid) // noises
      self.assertLen({tuple(sorted(s.items())) for s in grid}, len(grid))
    self.assertEqual(set(sizes.values()), {9})

  def test_bad_grids_and_overlapping_seeds_are_refused(self):
    with self.assertRaisesRegex(ValueError, 'same number of rate settings'):
      dataclasses.replace(TINY, supervised_rate_grid=(0.5, 1.0)).check()
    with self.assertRaisesRegex(ValueError, 'overlap'):
      dataclasses.replace(TINY, first_tuning_seed=0).check()

  def test_one_seed_run_of_the_whole_protocol_writes_table_and_figure(self):
    output_dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, output_dir, ignore_errors=True)
    payload = protocol_lib.run(TINY, output_dir, command='tiny',
                               log=lambda _: None)
    self.assertEqual(list(payload['methods']), list(
        protocol_lib.METHOD_NAMES))
    for name, result in payload['methods'].items():
      self.assertEqual(result['summary']['n'], 1, name)
      self.assertBetween(result['summary']['mean'], 0.0, 1.0)
      self.assertEqual(result['tuning']['convergence']['num_steps'], 6)
    # UDA rows ran with noise and report their mask rate; the others not.
    self.assertEqual(payload['methods']['uda']['tuning']['selected']
                     ['setting']['noise_std'], 0.1)
    self.assertNotIn('noise_std', payload['methods']['mpl']['tuning']
                     ['selected']['setting'])
    with open(os.path.join(output_dir, 'results', 'two_moon.json')) as f:
      self.assertEqual(json.load(f)['command'], 'tiny')
    with open(os.path.join(output_dir, 'figures', 'two_moon.png'), 'rb') as f:
      self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')
    table = '\n'.join(report.two_moon(payload))
    self.assertIn('UDA + MPL (Algorithm 1)', table)
    self.assertIn('(the feedback, with UDA)', table)

  def test_json_is_written_without_figure_panels_and_titles_the_counts(self):
    """--methods=fully_supervised draws no panel: its JSON is still written
    (drawing zero panels failed after all the training, before the JSON),
    and the figure's title gives the points the run drew."""
    output_dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, output_dir, ignore_errors=True)
    result = {'title': 'ceiling'}
    with mock.patch.object(protocol_lib, '_run_methods', return_value={
        'fully_supervised': (result, None)}):
      protocol_lib.run(dataclasses.replace(TINY, methods=('fully_supervised',)),
                       output_dir, log=lambda _: None)
    with open(os.path.join(output_dir, 'results', 'two_moon.json')) as f:
      self.assertEqual(json.load(f)['methods'], {'fully_supervised': result})
    self.assertFalse(os.path.exists(os.path.join(output_dir, 'figures')))
    panel = two_moon.Panel('Supervised', 0.5, np.zeros((2, 2)))
    moons = dataclasses.replace(MOONS, labeled_per_class=2,
                                unlabeled_per_class=20)
    with mock.patch.object(protocol_lib, '_run_methods', return_value={
        'supervised': (result, panel)}), mock.patch.object(
            two_moon, 'plot_panels') as plot:
      protocol_lib.run(dataclasses.replace(TINY, two_moon=moons,
                                           methods=('supervised',)),
                       output_dir, log=lambda _: None)
    self.assertEqual(plot.call_args.args[1], [panel])
    self.assertStartsWith(plot.call_args.args[3],
                          'TwoMoon, seed 0: 4 labeled + 40 unlabeled points')


if __name__ == '__main__':
  tf.test.main()
