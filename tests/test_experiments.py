"""The TwoMoon experiment and the ablation grid: data, network, tiny runs.

Everything runs a handful of steps: these tests check that the experiments
are wired to the library as documented (sizes, the paper's network, one field
per variant, train.run on digits), not the numbers in docs/results.md.
"""

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl import flags as absl_flags

from flags import experiment_flags
from mpl_tf.config import ConfigError, MplConfig
from mpl_tf.experiments import ablation
from mpl_tf.experiments import report
from mpl_tf.experiments import two_moon
from mpl_tf.experiments import two_moon_tuning

TINY = two_moon.TwoMoonConfig(num_steps=5, unlabeled_batch=16, test_points=200,
                              num_seeds=1)


class TwoMoonTest(tf.test.TestCase):

  def test_data_has_the_papers_sizes_and_two_balanced_classes(self):
    data = two_moon.make_data(two_moon.TwoMoonConfig(), seed=3)
    self.assertEqual(data.x_labeled.shape, (6, 2))
    self.assertEqual(data.x_unlabeled.shape, (1994, 2))
    self.assertEqual(data.x_test.shape, (2000, 2))
    self.assertAllEqual(np.bincount(data.y_labeled), [3, 3])
    self.assertAllEqual(np.bincount(data.y_unlabeled), [997, 997])
    self.assertAllEqual(np.bincount(data.y_test), [1000, 1000])
    # The labeled points are not among the unlabeled ones.
    pairs = {tuple(p) for p in data.x_unlabeled}
    self.assertFalse(any(tuple(p) in pairs for p in data.x_labeled))

  def test_network_is_two_sigmoid_layers_of_eight_units(self):
    model = two_moon.build_network(two_moon.TwoMoonConfig(), seed=0, name='n')
    dense = [layer for layer in model.layers if hasattr(layer, 'units')]
    self.assertEqual([layer.units for layer in dense], [8, 8, 2])
    self.assertEqual([layer.activation.__name__ for layer in dense],
                     ['sigmoid', 'sigmoid', 'linear'])
    # (2*8 + 8) + (8*8 + 8) + (8*2 + 2).
    self.assertEqual(model.count_params(), 114)

  def test_flags_read_into_the_config(self):
    flag_values = absl_flags.FlagValues()
    experiment_flags.define_two_moon(flag_values)
    flag_values(['two_moon', '--num_steps=7', '--pseudo_label=argmax',
                 '--output_dir='])
    config, output_dir = experiment_flags.two_moon_config(flag_values)
    self.assertEqual(config, dataclasses.replace(
        two_moon.TwoMoonConfig(), num_steps=7, pseudo_label='argmax'))
    self.assertIsNone(output_dir)


  def test_protocol_flags_read_into_the_config(self):
    from mpl_tf.experiments import two_moon_protocol  # pylint: disable=g-import-not-at-top
    flag_values = absl_flags.FlagValues()
    experiment_flags.define_two_moon_protocol(flag_values)
    flag_values(['two_moon', '--rate_grid=0.2,1', '--step_counts=10,20',
                 '--supervised_rate_grid=1,2,3,4', '--noise=0.15',
                 '--methods=uda,uda_mpl', '--output_dir='])
    config, output_dir = experiment_flags.two_moon_protocol_config(
        flag_values)
    self.assertEqual(config, two_moon_protocol.ProtocolConfig(
        two_moon=dataclasses.replace(two_moon.TwoMoonConfig(), noise=0.15),
        rate_grid=(0.2, 1.0), step_counts=(10, 20),
        supervised_rate_grid=(1.0, 2.0, 3.0, 4.0),
        methods=('uda', 'uda_mpl')))
    self.assertIsNone(output_dir)
    flag_values(['two_moon', '--supervised_rate_grid=1'])
    with self.assertRaisesRegex(ConfigError, 'same number of rate settings'):
      experiment_flags.two_moon_protocol_config(flag_values)


class AblationTest(tf.test.TestCase):

  def test_each_variant_changes_exactly_its_field(self):
    base = MplConfig(uda_weight=0.0)
    configs = ablation.grid(base)
    self.assertEqual(list(configs), list(ablation.VARIANTS))
    reference = configs['algorithm_1']
    self.assertEqual(reference, dataclasses.replace(base, **ablation.BASE_FIELDS))
    expected = {'algorithm_1': {}, 'argmax': {'pseudo_label'},
                'soft': {'pseudo_label'}, 'taylor': {'feedback'},
                'released_sign': {'feedback_sign'},
                'baseline_0.99': {'baseline_decay'},
                'mpl_weight_0': {'mpl_weight'}}
    for variant, config in configs.items():
      changed = {field.name for field in dataclasses.fields(MplConfig)
                 if getattr(config, field.name) != getattr(reference,
                                                           field.name)}
      self.assertEqual(changed, set(expected[variant]), variant)
    self.assertEqual(configs['soft'].pseudo_label, 'soft')
    self.assertEqual(configs['baseline_0.99'].baseline_init, 'uniform_sqrt3')
    self.assertEqual(configs['released_sign'].feedback_sign, 'released_code')

  def test_flags_reject_unknown_variants(self):
    flag_values = absl_flags.FlagValues()
    experiment_flags.define_ablation(flag_values)
    flag_values(['ablation', '--variants=soft,argmax', '--image_steps=3'])
    config, _ = experiment_flags.ablation_config(flag_values)
    self.assertEqual(config.variants, ('soft', 'argmax'))
    self.assertEqual(config.image_steps, 3)
    flag_values(['ablation', '--variants=soft,nonsense'])
    with self.assertRaisesRegex(ConfigError, 'nonsense'):
      experiment_flags.ablation_config(flag_values)

  def test_two_moon_task_writes_every_variant(self):
    output_dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, output_dir, ignore_errors=True)
    config = ablation.AblationConfig(tasks=('two_moon',),
                                     variants=('soft', 'mpl_weight_0'),
                                     two_moon=TINY, two_moon_seeds=1)
    payload = ablation.run_task(config, 'two_moon', output_dir,
                                log=lambda _: None)
    self.assertEqual(set(payload['variants']), {'soft', 'mpl_weight_0'})
    for entry in payload['variants'].values():
      self.assertBetween(entry['test_accuracy']['student']['mean'], 0.0, 1.0)
    self.assertTrue(os.path.exists(
        os.path.join(output_dir, 'results', 'ablation_two_moon.json')))

  def test_one_step_digits_run_through_train(self):
    data_dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, data_dir, ignore_errors=True)
    config = ablation.AblationConfig(
        image_steps=1, image_data_dir=data_dir,
        image_flags=('--labeled_batch_size=4', '--uda_ratio=1',
                     '--labeled_per_class=2', '--num_validation=50',
                     '--num_test=50', '--eval_batch_size=50'))
    mpl = ablation.variant_config(
        ablation.image_base_config(config, data_dir).mpl, 'taylor')
    self.assertEqual(mpl.uda_weight, 2.0)   # IMAGE_ARGS reached the config
    row = ablation.run_image_variant(config, mpl, seed=0)
    for network in ablation.IMAGE_NETWORKS:
      self.assertBetween(row[network], 0.0, 1.0)


if __name__ == '__main__':
  tf.test.main()


class TwoMoonTuningTest(tf.test.TestCase):

  def test_every_setting_is_a_valid_config(self):
    names = set()
    for name, fields, mpl_fields in two_moon_tuning.settings():
      names.add(name)
      dataclasses.replace(two_moon.TwoMoonConfig(), **fields)
      two_moon.mpl_config(two_moon.TwoMoonConfig(), **mpl_fields)
    self.assertLen(names, len(two_moon_tuning.settings()))

  def test_pseudo_labels_and_mpl_share_data_and_differ_in_feedback(self):
    setting = ('tiny', {'num_steps': 5, 'mpl_weight': 1.0}, {})
    result = two_moon_tuning.run_setting(
        dataclasses.replace(TINY, unlabeled_batch=16), setting, seeds=[0])
    run = result['runs'][0]
    self.assertAllClose(result['mean_gap'], run['mpl'] - run['pseudo_labels'])
    self.assertLessEqual(result['mpl_wins'] + result['mpl_losses'], 1)
    self.assertGreater(result['h_mean_abs'], 0.0)


class ReportTest(tf.test.TestCase):

  def test_blocks_are_rendered_from_their_json_and_others_left(self):
    results_dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, results_dir, ignore_errors=True)
    entry = lambda mean: {'mean': mean, 'std': 0.01, 'n': 3}
    payload = {'command': 'python -m mpl_tf.experiments.ablation --x',
               'seconds': 12.0, 'variants': {
                   'algorithm_1': {'test_accuracy': {'student': entry(0.75)}},
                   'mpl_weight_0': {'test_accuracy': {'student': entry(0.5)}}}}
    with open(os.path.join(results_dir, 'ablation_digits.json'), 'w') as f:
      json.dump(payload, f)
    text = ('intro\n<!-- generated: ablation_digits -->\nold table\n'
            '<!-- end generated: ablation_digits -->\nmiddle\n'
            '<!-- generated: two_moon -->\nkept\n'
            '<!-- end generated: two_moon -->\n')
    rendered = report.render(text, results_dir, log=lambda _: None)
    self.assertNotIn('old table', rendered)
    self.assertIn('| algorithm_1 | 0.750 ± 0.010 | +0.250 | 3 |', rendered)
    self.assertIn('`python -m mpl_tf.experiments.ablation --x` (12 s)',
                  rendered)
    # No two_moon.json in results_dir: that block is left as it was.
    self.assertIn('<!-- generated: two_moon -->\nkept\n', rendered)
    self.assertTrue(rendered.startswith('intro\n'))
    self.assertTrue(rendered.endswith('<!-- end generated: two_moon -->\n'))
