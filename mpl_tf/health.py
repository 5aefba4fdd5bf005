"""NaN and Inf in a training step: detect on the device, then skip or stop.

Shared by every step (MPL, UDA, supervised); the loop (train.py) reads the
guard's counters after each device loop and never saves a non-finite state.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from mpl_tf import loss_scale

_FIRST = tf.VariableAggregation.ONLY_FIRST_REPLICA


class NonFiniteGuard:
  """Checks a step's losses and gradient norms; skips or records the step.

  Everything happens on the device, with no host round trip inside the
  device loop: the step passes its global (all-reduced) losses and gradient
  norms to `check`, which returns one boolean `ok` that is identical on
  every replica. A NaN or Inf anywhere in a gradient makes its global norm
  non-finite, so checking the norms covers every gradient at the price of a
  handful of scalars.

  policy='skip': `snapshot` copies the mutable float state (weights,
  batch-norm statistics, optimizer slots, EMA weights, the h baseline)
  before the step and `restore_unless(ok, ...)` puts it back with tf.where
  when the step was non-finite: the whole step is undone, not just one
  network's update, because in MPL the teacher's feedback h is measured on
  the student's new weights and means nothing if the student's update was
  not finite (and a student update cannot otherwise be undone after the
  teacher's terms turn out non-finite). The step counter and the optimizers'
  iteration counts still advance, so the learning-rate schedules, the input
  stream and the pseudo-label draws stay functions of the step. The copy
  costs transient memory of one more set of that state, only in 'skip' mode.

  policy='stop': nothing is copied; the first non-finite step and its terms
  are recorded in variables the loop reads after each device loop, and it
  then ends the run without saving the non-finite state.

  Loss scales (float16 networks, loss_scale.py): an overflow of a scaled
  gradient undoes the step under either policy (so the state is copied in
  'stop' mode too), halves that scale and is not a non-finite step; what
  counts as an overflow is written in loss_scale.py.

  The counters are checkpointed (`checkpoint_item`), so a resumed run keeps
  counting.
  """

  def __init__(self, policy: str, state: Sequence[tf.Variable],
               loss_scales: Sequence[loss_scale.DynamicLossScale] = ()):
    if policy not in ('stop', 'skip'):
      raise ValueError(f'nonfinite={policy!r} is not stop or skip.')
    self.policy = policy
    # In the step's order: a later scale's gradients may depend on an
    # earlier one's (the MPL teacher's on the student's update).
    self.loss_scales = loss_scale.active(loss_scales)
    self._state = [v for v in state if tf.as_dtype(v.dtype).is_floating] if (
        policy == 'skip' or self.loss_scales) else []
    make = lambda value, name: tf.Variable(
        value, dtype=tf.int64, trainable=False, name=name, aggregation=_FIRST)
    self.skipped_steps = make(0, 'skipped_steps')
    # Non-finite steps in a row up to now. The loop stops a 'skip' run when
    # it reaches run.nonfinite_skip_limit, because then the state every step
    # starts from is itself broken (finite weights so large that the next
    # forward pass overflows) and skipping would go on to the end with it.
    # Checkpointed: a run resumed after that stop (or after any restart)
    # must go on counting, or it would skip up to `limit - 1` more steps per
    # restart and could finish with the broken state.
    self.consecutive_skipped = make(0, 'consecutive_skipped_steps')
    # The first step with a non-finite term (-1: none yet), and which terms
    # were non-finite then, as bits in the order of `term_names`.
    self.first_step = make(-1, 'first_nonfinite_step')
    self.first_terms = make(0, 'first_nonfinite_terms')
    self.term_names: List[str] = []

  def checkpoint_item(self) -> tf.train.Checkpoint:
    # A checkpoint written before consecutive_skipped_steps was saved
    # restores it as 0 (restore matches only the objects it holds).
    items = dict(skipped_steps=self.skipped_steps,
                 consecutive_skipped_steps=self.consecutive_skipped,
                 first_nonfinite_step=self.first_step,
                 first_nonfinite_terms=self.first_terms)
    if self.loss_scales:   # (float16 only: other checkpoints unchanged)
      items['loss_scales'] = tf.train.Checkpoint(**{
          scale.name: scale.checkpoint_item() for scale in self.loss_scales})
    return tf.train.Checkpoint(**items)

  def loss_scale_variables(self) -> List[tf.Variable]:
    return [v for scale in self.loss_scales for v in scale.variables]

  def run(self, step, step_fn: Callable[[], Tuple[Dict[str, tf.Tensor], Any]],
          checked: Sequence[str], forward: Sequence[str] = ()
          ) -> Tuple[Dict[str, tf.Tensor], Any]:
    """Runs one training step under the guard: every step's one wrapper.

    `step_fn()` updates the networks and returns (metrics, extra); the
    metrics named in `checked` must be global values, listed in the order a
    NaN would spread (the first non-finite one is what the loop reports);
    `forward` names those of them computed before any gradient. Under
    'skip' the whole step is undone unless they are all finite, and under
    either policy when a loss scale overflowed. Adds 'health/nonfinite'
    (1 for a non-finite step), and with loss scales 'health/overflow' (1
    for an overflow) and each scale S the step used, to the metrics.
    """
    for scale in self.loss_scales:
      scale.begin_step()
    before_step = self.snapshot()
    metrics, extra = step_fn()
    overflowed = loss_scale.overflows(self.loss_scales,
                                      [metrics[name] for name in forward])
    overflow = tf.reduce_any(tf.stack([tf.constant(False)] + overflowed))
    ok = self.check(step, {name: metrics[name] for name in checked},
                    excused=overflow)
    self.restore_unless(ok, before_step)
    # The fraction of the loop's steps that were non-finite, once averaged.
    metrics['health/nonfinite'] = 1.0 - tf.cast(
        tf.logical_or(ok, overflow), tf.float32)
    if self.loss_scales:
      metrics['health/overflow'] = tf.cast(overflow, tf.float32)
      for scale in self.loss_scales:
        metrics[f'loss_scale/{scale.name}'] = tf.identity(scale.scale)
      with tf.control_dependencies(list(metrics.values())):
        loss_scale.update(self.loss_scales, overflowed, ok)
    return metrics, extra

  def snapshot(self) -> List[tf.Tensor]:
    return [tf.identity(v) for v in self._state]

  def check(self, step, terms: Dict[str, tf.Tensor],
            excused=False) -> tf.Tensor:
    """ok (a scalar bool) iff every term is finite and not `excused`.

    A step that is not ok is recorded as non-finite unless `excused` (a
    loss-scale overflow), which leaves every counter here as it was.
    `terms` must be global values (the same on every replica).
    """
    self.term_names = list(terms)
    finite = tf.stack([tf.reduce_all(tf.math.is_finite(tf.cast(t, tf.float32)))
                       for t in terms.values()])
    excused = tf.convert_to_tensor(excused)
    ok = tf.logical_and(tf.reduce_all(finite), tf.logical_not(excused))
    nonfinite = tf.logical_not(tf.logical_or(ok, excused))
    bits = tf.reduce_sum(tf.where(
        finite, tf.constant(0, tf.int64),
        tf.bitwise.left_shift(tf.constant(1, tf.int64),
                              tf.range(len(terms), dtype=tf.int64))))
    first = tf.logical_and(nonfinite, self.first_step < 0)
    step = tf.cast(step, tf.int64)
    self.first_terms.assign(tf.where(first, bits, self.first_terms))
    self.first_step.assign(tf.where(first, step, self.first_step))
    self.skipped_steps.assign_add(tf.cast(nonfinite, tf.int64))
    self.consecutive_skipped.assign(tf.where(
        ok, tf.constant(0, tf.int64),
        tf.where(excused, self.consecutive_skipped,
                 self.consecutive_skipped + 1)))
    return ok

  def restore_unless(self, ok: tf.Tensor, snapshot: List[tf.Tensor]) -> None:
    """policy='skip': puts the state of before the step back unless ok."""
    for variable, saved in zip(self._state, snapshot):
      variable.assign(tf.where(ok, tf.convert_to_tensor(variable), saved))

  def describe(self) -> Optional[str]:
    """On the host: 'step S: a, b' for the first non-finite step, or None."""
    step = int(tf.convert_to_tensor(self.first_step).numpy())
    if step < 0:
      return None
    bits = int(tf.convert_to_tensor(self.first_terms).numpy())
    if not self.term_names:
      return f'step {step + 1}'   # restored, before the step was traced
    names = [name for i, name in enumerate(self.term_names) if bits >> i & 1]
    return f'step {step + 1} ({", ".join(names) or "unknown term"})'


def float_state(*items) -> List[tf.Variable]:
  """The variables of models and optimizers that a skipped step restores.

  Optimizer iteration counts are left out on purpose: they keep counting
  steps, skipped or not, like the step counter.
  """
  state, seen = [], set()
  for item in items:
    if item is None:
      continue
    if isinstance(item, keras.optimizers.Optimizer):
      variables = [v for v in item.variables if v is not item.iterations]
    elif isinstance(item, keras.Model):
      variables = item.variables
    else:
      variables = [item]
    for variable in variables:
      if id(variable) not in seen:
        seen.add(id(variable))
        state.append(variable)
  return state
