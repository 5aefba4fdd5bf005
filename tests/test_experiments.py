"""The TwoMoon experiment and the ablation grid: data, network, tiny runs.

Everything runs a handful of steps: these tests check that the experiments
are wired to the library as documented (sizes, the paper's network, one field
per variant, train.run on digits), not the numbers in docs/results.md.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl import flags as absl_flags

import experiment
from flags import experiment_flags
from mpl_tf.config import Config, ConfigError, MplConfig
from mpl_tf.experiments import ablation
from mpl_tf.experiments import report
from mpl_tf.experiments import two_moon
from mpl_tf.experiments import two_moon_tuning
from tests.testing import run_cli_in_process

TINY = two_moon.TwoMoonConfig(num_steps=5, unlabeled_batch=16, test_points=200)


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
    self.assertEqual(config.image.optim.num_steps, 3)
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
    image = experiment_flags.image_base_config(
        1, 'wrn-10-1', data_dir,
        ('--labeled_batch_size=4', '--uda_ratio=1', '--labeled_per_class=2',
         '--num_validation=50', '--num_test=50', '--eval_batch_size=50'))
    config = ablation.AblationConfig(image=image)
    mpl = ablation.variant_config(
        ablation.image_config(config, data_dir).mpl, 'taylor')
    self.assertEqual(mpl.uda_weight, 2.0)   # IMAGE_ARGS reached the config
    row = ablation.run_image_variant(config, mpl, seed=0)
    for network in ablation.IMAGE_NETWORKS:
      self.assertBetween(row[network], 0.0, 1.0)

  def test_digits_configs_are_the_callers_base_validated(self):
    with self.assertRaisesRegex(ConfigError, 'AblationConfig.image'):
      ablation.image_config(ablation.AblationConfig(), '/tmp/x')
    config = ablation.AblationConfig(image=Config())
    run_config = ablation.image_config(config, '/tmp/x', seed=3)
    self.assertEqual((run_config.run.model_dir, run_config.run.seed),
                     ('/tmp/x', 3))
    with self.assertRaisesRegex(ConfigError, 'baseline_decay'):
      ablation.image_config(config, '/tmp/x',
                            MplConfig(baseline_decay=1.5))




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
    payload = {'command': 'python experiment.py ablation --x',
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
    self.assertIn('`python experiment.py ablation --x` (12 s)',
                  rendered)
    # No two_moon.json in results_dir: that block is left as it was.
    self.assertIn('<!-- generated: two_moon -->\nkept\n', rendered)
    self.assertTrue(rendered.startswith('intro\n'))
    self.assertTrue(rendered.endswith('<!-- end generated: two_moon -->\n'))


def _run_command(*args):
  """(exit status, stderr) of `python experiment.py *args`, in-process."""
  return run_cli_in_process(experiment.run_cli, ['experiment.py', *args])


class CommandTest(tf.test.TestCase):

  def test_user_errors_are_one_message_and_status_2(self):
    for args, message in (
        (('nonsense',), "unknown experiment 'nonsense'"),
        (('two_moon', '--num_seeds=1'), "Unknown command line flag"),
        (('two_moon', '--supervised_rate_grid=1', '--output_dir='),
         'same number of rate settings'),
        (('ablation', '--variants=nonsense'), 'nonsense'),
        (('ablation', '--image_flags=--no_such_flag'),
         "--image_flags: Unknown command line flag 'no_such_flag'"),
        (('report', '--output_dir='), 'results.md'),
        (('report', '--output_dir=/nonexistent'),
         'no /nonexistent/results.md')):
      status, stderr = _run_command(*args)
      self.assertEqual(status, 2, args)
      self.assertIn(message, stderr)
      self.assertNotIn('Traceback', stderr)
    self.assertEqual(_run_command()[0], 2)
    self.assertEqual(_run_command('--help')[0], 0)

  def test_output_dir_defaults_to_runs_never_docs(self):
    """Without --output_dir an experiment writes under runs/experiments/NAME,
    never over the committed docs/results; report, which rewrites a
    results.md in place, is refused unless --output_dir names one."""
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    self.enterContext(contextlib.chdir(workdir))
    for name, define, read in (
        ('two_moon', experiment_flags.define_two_moon_protocol,
         experiment_flags.two_moon_protocol_config),
        ('two_moon_tuning', experiment_flags.define_two_moon_tuning,
         experiment_flags.two_moon_tuning_config),
        ('ablation', experiment_flags.define_ablation,
         experiment_flags.ablation_config)):
      flag_values = absl_flags.FlagValues()
      define(flag_values)
      flag_values(['experiment.py'])
      self.assertEqual(read(flag_values)[-1],
                       os.path.join('runs', 'experiments', name), name)
    os.makedirs(os.path.join('docs', 'results'))
    markdown = ('<!-- generated: two_moon -->\nkept\n'
                '<!-- end generated: two_moon -->\n')
    with open(os.path.join('docs', 'results.md'), 'w') as f:
      f.write(markdown)
    status, stderr = _run_command('report')
    self.assertEqual(status, 2)
    self.assertEqual(stderr, 'error: --output_dir: the directory whose '
                     'results.md is re-rendered from its results/*.json; pass '
                     '--output_dir=docs for docs/results.md.\n')
    with open(os.path.join('docs', 'results.md')) as f:
      self.assertEqual(f.read(), markdown)
    self.assertEqual(os.listdir('.'), ['docs'])

  def test_ablation_records_its_command_line(self):
    output_dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, output_dir, ignore_errors=True)
    args = ('ablation', '--ablation_tasks=two_moon', '--variants=soft',
            '--two_moon_seeds=1', '--num_steps=5', '--unlabeled_batch=16',
            '--test_points=200', f'--output_dir={output_dir}')
    status, stderr = _run_command(*args)
    self.assertEqual(status, 0, stderr)
    with open(os.path.join(output_dir, 'results',
                           'ablation_two_moon.json')) as f:
      payload = json.load(f)
    self.assertEqual(payload['command'],
                     ' '.join(['python experiment.py', *args]))
    self.assertEqual(list(payload['variants']), ['soft'])

  def test_report_rewrites_results_md_in_place(self):
    output_dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, output_dir, ignore_errors=True)
    os.makedirs(os.path.join(output_dir, 'results'))
    entry = {'mean': 0.5, 'std': 0.0, 'n': 1}
    with open(os.path.join(output_dir, 'results', 'ablation_digits.json'),
              'w') as f:
      json.dump({'command': 'c', 'variants': {
          'soft': {'test_accuracy': {'student': entry}}}}, f)
    with open(os.path.join(output_dir, 'results.md'), 'w') as f:
      f.write('<!-- generated: ablation_digits -->\nold\n'
              '<!-- end generated: ablation_digits -->\n')
    status, stderr = _run_command('report', f'--output_dir={output_dir}')
    self.assertEqual(status, 0, stderr)
    with open(os.path.join(output_dir, 'results.md')) as f:
      text = f.read()
    self.assertIn('| soft | 0.500 ± 0.000 | 1 |', text)
    self.assertNotIn('old', text)


if __name__ == '__main__':
  tf.test.main()
