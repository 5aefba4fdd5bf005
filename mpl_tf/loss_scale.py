"""Dynamic loss scaling for networks that compute in float16.

Why: float16's smallest (subnormal) number is 2**-24, about 6e-8. The
losses are divided by the global batch, so the gradients that flow back
through a network's float16 layers are often smaller than that: they are
flushed to zero and those layers stop learning, without any NaN to notice.
bfloat16 has float32's range and needs none of this.

What: each network that computes in float16 (`precision=mixed_float16`;
found from its layers' dtype policies, `computes_in_float16`) gets one
`DynamicLossScale` S. Its step differentiates S * loss instead of the loss
(`gradient`, recorded on the network's tape), sums the gradients across
replicas, and divides them by S (`unscaled`) before anything else reads
them: weight decay, clipping, the optimizer, and the MPL feedback h, which is
therefore computed from unscaled gradients ('exact') or unscaled losses
('taylor', which never sees S). S is a power of two, so the division is
exact. `unscaled` also records whether the summed gradients were all finite:
they are the same on every replica, so every replica decides alike.

The scale moves as Keras's and TensorFlow's dynamic loss scale does (initial
2**15, doubled after 2,000 good steps, halved on an overflow), with two
bounds of our own: it stays within [1, 2**24], so that S * loss stays far
from float32's range and an overflow at S = 1 is a gradient that is itself
not finite. The non-finite guard (health.NonFiniteGuard.run) owns the
decision, after the whole step, in the order of the step's scales (MPL:
the student's, then the teacher's, whose loss holds h from the student):

  overflow  a scale whose network's gradients are not all finite while its
            S > 1, every forward loss the step checks before its gradients
            is finite, and every earlier scale's gradients were finite.
            The whole step is undone like a skipped one (networks, batch-norm
            statistics, optimizer slots, EMA, h baseline), under either
            --nonfinite policy; that scale halves, its overflow count
            (`overflow_steps`) grows; other scales keep their S. It is not a
            non-finite step: --nonfinite=stop does not stop, and neither
            health/skipped_steps nor the run of non-finite steps in a row
            (--nonfinite_skip_limit) counts it. It logs health/overflow.
  ok        every checked term finite: every scale counts a good step and
            doubles after `growth_interval` good steps in a row.
  otherwise a non-finite step as without scaling (a forward loss that is not
            finite, or gradients that are not finite at S = 1, the first
            after the scale reached its minimum): --nonfinite decides; the
            scales keep S and start counting good steps again.

A skipped step of either kind still advances the step counter and the
optimizers' iteration counts (health.py), so schedules, input streams and
pseudo-label draws stay functions of the step.

Saved: each active scale's S, good-step count and overflow count, in the
guard's checkpoint item (every step's `checkpoint_items()['health']`), so a
resumed run goes on with the same S. A network that does not compute in
float16 gets an inactive scale: no variable, no op, the step unchanged.

Why not Keras 3's `keras.optimizers.LossScaleOptimizer`: it unscales inside
`apply_gradients`, but the steps need unscaled gradients before that (h, the
coupled weight decay and global-norm clipping all read them: clipping scaled
gradients would clip at S times the norm); and on an overflow it skips its
own optimizer's update only, without advancing the iteration count, while
an MPL step must be undone whole (the student's update, the EMA, the h
baseline and the teacher's update, which reads the student's) with the
schedules kept on the step.
"""

import threading
from typing import List, Sequence

import keras
import tensorflow as tf

INITIAL_SCALE = 2.0 ** 15
GROWTH_INTERVAL = 2000
MIN_SCALE = 1.0
MAX_SCALE = 2.0 ** 24
_FIRST = tf.VariableAggregation.ONLY_FIRST_REPLICA


def computes_in_float16(model: keras.Model) -> bool:
  """Whether any layer of `model` computes in float16."""
  return any(
      getattr(layer, 'compute_dtype', None) == 'float16'
      for layer in model._flatten_layers(include_self=True))  # pylint: disable=protected-access


class DynamicLossScale:
  """One network's loss scale S; inactive (identity, no state) if not float16.

  Create it in the distribution strategy's scope. Its variables aggregate
  ONLY_FIRST_REPLICA: every replica assigns the same value.

  What `unscaled` records for the guard is kept per thread: MirroredStrategy
  traces each replica's step in a thread of its own, and one list shared by
  the replicas would mix (and clear) each other's records. TPUStrategy and
  one device trace the step once, in one thread.
  """

  def __init__(self, name: str, active: bool,
               initial: float = INITIAL_SCALE,
               growth_interval: int = GROWTH_INTERVAL):
    self.name = name
    self.active = bool(active)
    self.growth_interval = int(growth_interval)
    self._records = threading.local()
    if not self.active:
      return
    if not MIN_SCALE <= initial <= MAX_SCALE:
      raise ValueError(f'loss scale {initial} is not in [{MIN_SCALE}, '
                       f'{MAX_SCALE}].')
    make = lambda value, dtype, suffix: tf.Variable(
        value, dtype=dtype, trainable=False, aggregation=_FIRST,
        name=f'{name}_{suffix}')
    self.scale = make(initial, tf.float32, 'loss_scale')
    self.good_steps = make(0, tf.int64, 'loss_scale_good_steps')
    self.overflow_steps = make(0, tf.int64, 'loss_scale_overflow_steps')

  @classmethod
  def for_network(cls, model: keras.Model, name: str) -> 'DynamicLossScale':
    return cls(name, computes_in_float16(model))

  @property
  def variables(self) -> List[tf.Variable]:
    return ([self.scale, self.good_steps, self.overflow_steps]
            if self.active else [])

  def checkpoint_item(self) -> tf.train.Checkpoint:
    return tf.train.Checkpoint(scale=self.scale, good_steps=self.good_steps,
                               overflow_steps=self.overflow_steps)

  def begin_step(self) -> None:
    """Forgets the previous step's gradients (called by the guard)."""
    self._records.finite = []

  def gradient(self, tape: tf.GradientTape, loss: tf.Tensor,
               variables: Sequence) -> list:
    """tape.gradient of S * loss: this replica's scaled gradients.

    The product is recorded on `tape` (re-entered for it), so `loss` may
    come from a closed tape block. Float32, so that S * loss cannot
    overflow where the loss itself is float16.
    """
    if not self.active:
      return tape.gradient(loss, variables)
    with tape:
      scaled = tf.cast(loss, tf.float32) * tf.convert_to_tensor(self.scale)
    return tape.gradient(scaled, variables)

  def unscaled(self, grads: Sequence) -> list:
    """Gradients summed across replicas, divided by S; records finiteness.

    Call it on the summed gradients, in the step's own graph (not inside a
    loop body): the guard reads what it recorded after the step.
    """
    if not self.active:
      return list(grads)
    present = [g for g in grads if g is not None]
    if present:
      self._records.finite.append(tf.reduce_all(tf.stack(
          [tf.reduce_all(tf.math.is_finite(g)) for g in present])))
    scale = tf.convert_to_tensor(self.scale)
    return [None if g is None else g / tf.cast(scale, g.dtype) for g in grads]

  def grads_finite(self) -> tf.Tensor:
    """Whether every gradient `unscaled` saw this step was finite."""
    finite = getattr(self._records, 'finite', [])
    if not finite:
      return tf.constant(True)
    return tf.reduce_all(tf.stack(finite))


def active(scales: Sequence[DynamicLossScale]) -> List[DynamicLossScale]:
  return [scale for scale in scales if scale.active]


def overflows(scales: Sequence[DynamicLossScale],
              forward: Sequence[tf.Tensor]) -> List[tf.Tensor]:
  """Per active scale, in the step's order: did it overflow this step?

  `forward`: the global forward losses checked before any gradient.
  """
  upstream_ok = tf.reduce_all(tf.stack(
      [tf.constant(True)] + [tf.reduce_all(tf.math.is_finite(
          tf.cast(value, tf.float32))) for value in forward]))
  flags = []
  for scale in active(scales):
    finite = scale.grads_finite()
    flags.append(tf.logical_and(
        tf.logical_and(upstream_ok, tf.logical_not(finite)),
        tf.convert_to_tensor(scale.scale) > MIN_SCALE))
    upstream_ok = tf.logical_and(upstream_ok, finite)
  return flags


def update(scales: Sequence[DynamicLossScale], overflowed: Sequence[tf.Tensor],
           ok: tf.Tensor) -> None:
  """After the guard's decision: halve, count, or double each scale."""
  for scale, overflow in zip(active(scales), overflowed):
    value = tf.convert_to_tensor(scale.scale)
    good = tf.where(ok, scale.good_steps + 1, tf.constant(0, tf.int64))
    grow = good >= scale.growth_interval
    scale.scale.assign(tf.where(
        overflow, tf.maximum(value * 0.5, MIN_SCALE),
        tf.where(grow, tf.minimum(value * 2.0, MAX_SCALE), value)))
    scale.good_steps.assign(tf.where(grow, tf.constant(0, tf.int64), good))
    scale.overflow_steps.assign_add(tf.cast(overflow, tf.int64))
