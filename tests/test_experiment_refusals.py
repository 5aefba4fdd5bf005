"""What `python experiment.py NAME` refuses before it trains anything.

Every count and number of every experiment is checked by its frozen
config's `check` before the experiment's run is called: a bad value ends
with one `error:` line naming the flag and the fix, exit status 2, and
nothing written. Here the experiments' run functions are mocks, so a value
that slipped through to training shows as a call (and costs nothing), and
each command's bad values are one table.
"""

import os
from unittest import mock

import tensorflow as tf

import experiment
from mpl_tf import models
from mpl_tf.experiments import ablation
from mpl_tf.experiments import two_moon_protocol
from mpl_tf.experiments import two_moon_tuning
from tests.testing import run_cli_in_process

_SEEDS = 'seeds of make_moons and the initial weights'
_TWO_MOON = (
    (('--test_points=0',), '--test_points=0: must be at least 2 (held-out '
     'test points, one per class at least).'),
    (('--hidden_units=0',), '--hidden_units=0: must be at least 1 (units of '
     'each hidden layer).'),
    (('--labeled_per_class=0',), '--labeled_per_class=0: must be at least 1 '
     '(labeled points per class).'),
    (('--unlabeled_per_class=0',), '--unlabeled_per_class=0: must be at least '
     '1 (unlabeled points per class).'),
    (('--momentum=1',), '--momentum=1: must be in [0, 1) (Nesterov momentum; '
     '0: plain SGD).'),
    (('--noise=-1',), "--noise=-1: must be at least 0 (the std of make_moons' "
     'Gaussian noise).'),
)
# two_moon and ablation: the batch every step draws (two_moon_tuning: each
# setting's).
_BATCH = (
    (('--unlabeled_batch=-1',), '--unlabeled_batch=-1: must be at least 0 '
     '(unlabeled points per step; 0: all of them).'),
    (('--unlabeled_batch=5000',), '--unlabeled_batch=5000: more than the 1994 '
     'unlabeled points (2 x --unlabeled_per_class); pass at most 1994, or 0 '
     'for all of them.'),
)


def _run_command(*args):
  """(exit status, stderr) of `python experiment.py *args`, in-process."""
  return run_cli_in_process(experiment.run_cli, ['experiment.py', *args])


class RefusalTest(tf.test.TestCase):

  def _check_refusals(self, name, module, cases, whole=True):
    """Each case of `cases` is refused with its message before `run`.

    whole=False: the message starts stderr (absl adds its own hints).
    """
    output_dir = os.path.join(self.get_temp_dir(), name)
    with mock.patch.object(module, 'run') as run:
      # The defaults reach the (mocked) run: the mock is the one called.
      self.assertEqual(_run_command(name, f'--output_dir={output_dir}'),
                       (0, ''))
      self.assertEqual(run.call_count, 1)
      for flags, message in cases:
        with self.subTest(flags=flags):
          status, stderr = _run_command(name, *flags,
                                        f'--output_dir={output_dir}')
          self.assertEqual(status, 2, stderr)
          if whole:
            self.assertEqual(stderr, f'error: {message}\n')
          else:
            self.assertStartsWith(stderr, f'error: {message}')
          self.assertEqual(run.call_count, 1)
    self.assertFalse(os.path.exists(output_dir))

  def test_two_moon_refuses_bad_counts(self):
    methods = ','.join(two_moon_protocol.METHOD_NAMES)
    self._check_refusals('two_moon', two_moon_protocol, _TWO_MOON + _BATCH + (
        (('--tuning_seeds=0',), "--tuning_seeds=0: must be at least 1 (seeds "
         "whose validation accuracy selects each method's setting)."),
        (('--tuning_seeds=-2',), "--tuning_seeds=-2: must be at least 1 "
         "(seeds whose validation accuracy selects each method's setting)."),
        (('--eval_seeds=0',), '--eval_seeds=0: must be at least 1 (seeds the '
         'selected settings are reported on).'),
        (('--first_tuning_seed=-1',), f'--first_tuning_seed=-1: must be at '
         f'least 0 ({_SEEDS}).'),
        (('--first_eval_seed=-1',), f'--first_eval_seed=-1: must be at least '
         f'0 ({_SEEDS}).'),
        (('--first_eval_seed=4294967290',), '--first_eval_seed=4294967290: '
         'its last seed, 4294967299, must be below 4294767296 (make_moons '
         "takes seeds below 2**32, and a seed's draws add up to 200000)."),
        (('--figure_seed=10',), '--figure_seed=10: not an evaluation seed; '
         'pass one of 0-9.'),
        (('--first_tuning_seed=5',), '--first_tuning_seed=5, --tuning_seeds=4:'
         ' the tuning seeds 5-8 overlap the evaluation seeds 0-9; choose '
         'disjoint seeds.'),
        (('--step_counts=',), '--step_counts is empty: pass at least one '
         'value, e.g. --step_counts=1000,3000,9000.'),
        (('--step_counts=0,1000',), '--step_counts=0,1000: every value must '
         'be at least 1 (not 0).'),
        (('--step_counts=1000,1000',), '--step_counts=1000,1000: 1000 is '
         'repeated; pass each value once.'),
        (('--rate_grid=',), '--rate_grid is empty: pass at least one value, '
         'e.g. --rate_grid=0.1,0.5,2.'),
        (('--rate_grid=0.5,-1,2',), '--rate_grid=0.5,-1,2: every value must '
         'be > 0 (not -1).'),
        (('--rate_grid=nan',), '--rate_grid=nan: every value must be > 0 (not '
         'nan).'),
        (('--supervised_rate_grid=0,0.1,0.2,0.35,0.5,1,2,3.5,5',),
         '--supervised_rate_grid=0,0.1,0.2,0.35,0.5,1,2,3.5,5: every value '
         'must be > 0 (not 0).'),
        (('--noise_grid=-0.1',), '--noise_grid=-0.1: every value must be at '
         'least 0 (not -0.1).'),
        (('--validation_points=1',), "--validation_points=1: must be at least "
         "2 (points of each seed's validation draw, one per class at least)."),
        (('--convergence_factor=1',), '--convergence_factor=1: must be at '
         'least 2 (the selected setting is retrained this many times the '
         'longest step count; 1 would repeat it).'),
        (('--uda_weight=0',), "--uda_weight=0: must be > 0 (weight of the "
         "teacher's UDA loss in the UDA methods)."),
        (('--uda_temperature=0',), '--uda_temperature=0: must be > 0 '
         '(sharpening temperature of the UDA target).'),
        (('--uda_threshold=1',), '--uda_threshold=1: must be in [0, 1) '
         '(confidence threshold of the UDA mask).'),
        (('--methods=',), f'--methods is empty: pass at least one value, e.g. '
         f'--methods={methods}.'),
        (('--methods=uda,uda',), '--methods=uda,uda: uda is repeated; pass '
         'each value once.'),
        (('--processes=0',), '--processes=0: must be at least 1 (methods run '
         'in this many processes at once).'),
    ))

  def test_two_moon_tuning_refuses_bad_counts(self):
    self._check_refusals('two_moon_tuning', two_moon_tuning, _TWO_MOON + (
        (('--tuning_seeds=0',), '--tuning_seeds=0: must be at least 1 (seeds '
         'each setting runs Pseudo Labels and MPL on).'),
        (('--first_seed=-1',), f'--first_seed=-1: must be at least 0 '
         f'({_SEEDS}).'),
        (('--first_seed=4294967295',), '--first_seed=4294967295: its last '
         'seed, 4294967298, must be below 4294867296 (make_moons takes seeds '
         "below 2**32, and a seed's draws add up to 100000)."),
        (('--unlabeled_per_class=10',), "--unlabeled_per_class=10: the grid's "
         'settings draw up to 64 unlabeled points per step, from 2 x 10; pass '
         'at least 32.'),
        (('--teacher_lr=0',), '--teacher_lr=0: must be > 0 (peak rate of the '
         'teacher and the supervised model).'),
    ))

  def test_ablation_refuses_bad_counts(self):
    variants = ','.join(ablation.VARIANTS)
    self._check_refusals('ablation', ablation, _TWO_MOON + _BATCH + (
        (('--two_moon_seeds=0',), '--two_moon_seeds=0: must be at least 1 '
         '(seeds per variant of the two_moon task).'),
        (('--image_seeds=0',), '--image_seeds=0: must be at least 1 (seeds '
         'per variant of the digits task).'),
        (('--image_steps=0',), '--image_steps=0: must be at least 1 (training '
         'steps of every digits run).'),
        (('--image_steps=-3', '--ablation_tasks=two_moon'), '--image_steps=-3:'
         ' must be at least 1 (training steps of every digits run).'),
        (('--num_steps=0',), '--num_steps=0: must be at least 1 (training '
         'steps).'),
        (('--student_lr=-1',), '--student_lr=-1: must be > 0 (peak rate of '
         'the student).'),
        (('--variants=',), f'--variants is empty: pass at least one value, '
         f'e.g. --variants={variants}.'),
        (('--variants=soft,nonsense',), f'--variants=soft,nonsense: every '
         f'value must be one of {", ".join(ablation.VARIANTS)} (not '
         f'nonsense).'),
        (('--ablation_tasks=',), '--ablation_tasks is empty: pass at least '
         'one value, e.g. --ablation_tasks=two_moon,digits.'),
        (('--ablation_tasks=two_moon,two_moon',), '--ablation_tasks='
         'two_moon,two_moon: two_moon is repeated; pass each value once.'),
        (('--image_model=nonsense',), "--image_model=nonsense: model="
         f"'nonsense' is unknown; known models: "
         f"{', '.join(models.KNOWN_NAMES)}."),
    ))

  def test_flags_an_experiment_would_ignore_are_unknown(self):
    """A TwoMoon flag the command overrides or never reads is no flag of it.

    two_moon_tuning's settings set the steps, the student's rate, the MPL
    weight and the batch, and its seeds are --tuning_seeds from
    --first_seed; the ablation's variants set the MPL choices and its seeds
    are 0 .. --two_moon_seeds-1; no command drew num_seeds or figure_seed.
    """
    for name, fields, _ in two_moon_tuning.settings():
      self.assertContainsSubset(
          {'num_steps', 'student_lr', 'mpl_weight', 'unlabeled_batch'},
          set(fields), name)
    unknown = lambda flag: (
        (f'--{flag}',), f"Unknown command line flag '{flag.split('=')[0]}'")
    self._check_refusals('two_moon_tuning', two_moon_tuning, [
        unknown(flag) for flag in (
            'num_steps=5', 'student_lr=1', 'mpl_weight=3',
            'unlabeled_batch=8', 'num_seeds=2', 'figure_seed=1')],
                         whole=False)
    self._check_refusals('ablation', ablation, [
        unknown(flag) for flag in (
            'mpl_weight=0', 'pseudo_label=argmax', 'feedback=taylor',
            'feedback_sign=released_code', 'num_seeds=2', 'first_seed=5',
            'figure_seed=1')], whole=False)


if __name__ == '__main__':
  tf.test.main()
