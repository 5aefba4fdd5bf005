"""The teacher's forward pass of one MPL step, in the variant the config asks.

Algorithm 1 needs the teacher's logits twice: before the student's update
(the pseudo labels are read from them) and after h is known (the teacher's
losses, and their gradient, are built on them). The three ways of running
that pass compute the same logits {labeled, ori, aug} and differ only in
cost and memory, so they live here, behind one object, and the step reads
as Algorithm 1 whichever is chosen:

  teacher_original_pass='shared' (default): one training-mode pass on
      [x_l; x_u_ori; x_u_aug], taped; the tape is re-entered once h is known
      to add the losses.
  teacher_original_pass='no_grad': x_u_ori, only the (stop-gradient) UDA
      target, gets a pass of its own outside the tape; the taped pass is
      [x_l; x_u_aug].
  rematerialize_teacher=True: the first pass runs untaped and leaves no
      trace (dropout RNG states and batch-norm moving statistics put back);
      it is repeated, taped, after h, drawing the same masks on the same
      batch. Its activations then do not live through the student's step.

freeze_teacher_batch_norm_statistics=True (the released code's teacher):
every pass restores the teacher's batch-norm moving statistics when it
ends, so no step moves them; under microbatches=K each chunk's pass then
moves them by zero and their mean over chunks is their value before.

Under microbatches=K (microbatches.py) the pass is `ChunkedTeacherPass`:
rematerialized chunk by chunk, whatever rematerialize_teacher says, since
one chunk's activations at a time is the point.

The choices themselves are described once, in mpl_tf.config.MplConfig.
"""

import contextlib
import dataclasses
from typing import Dict, Optional, Sequence

import keras
import tensorflow as tf

from mpl_tf.config import MplConfig
from mpl_tf.microbatches import Microbatches
from mpl_tf.models import restored_afterwards


class TeacherPass:
  """One step's teacher logits and the tape that differentiates them.

  `forward()` gives the logits the pseudo labels are read from; the block
  `with taped(after=h) as logits:` records the teacher's losses on the taped
  logits; `gradient(loss, variables, loss_scale)` differentiates them.
  """

  def __init__(self, teacher: keras.Model, config: MplConfig,
               images_labeled: tf.Tensor, images_ori: tf.Tensor,
               images_aug: tf.Tensor, *,
               batch_norm_statistics: Sequence[tf.Variable],
               rng_states: Sequence[tf.Variable],
               logits_ori: Optional[tf.Tensor] = None):
    self._teacher = teacher
    self._rematerialize = config.rematerialize_teacher
    self._batch_norm_statistics = list(batch_norm_statistics)
    # Restored after every pass when frozen; nothing (no op) otherwise.
    self._frozen_statistics = (
        self._batch_norm_statistics
        if config.freeze_teacher_batch_norm_statistics else [])
    self._rng_states = list(rng_states)
    self._images = (images_labeled, images_ori, images_aug)
    self._tape = tf.GradientTape()
    self._logits = None
    # 'no_grad': the UDA target's own pass comes first, as it always has
    # (or it ran before, and `logits_ori` are its logits).
    self._logits_ori_untaped = None
    if config.teacher_original_pass == 'no_grad':
      self._logits_ori_untaped = (
          self._original_without_backward(images_ori) if logits_ori is None
          else logits_ori)

  def forward(self) -> Dict[str, tf.Tensor]:
    """The first pass: the logits the pseudo labels are read from.

    Stop-gradient under rematerialize_teacher (they only choose the pseudo
    labels); otherwise taped, and the same tensors `taped` yields.
    """
    if self._rematerialize:
      with restored_afterwards(self._rng_states +
                               self._batch_norm_statistics):
        logits = self._logits_of_one_pass()
      self._logits = {key: tf.stop_gradient(value)
                      for key, value in logits.items()}
    else:
      with self._tape:
        self._logits = self._logits_of_one_pass()
    return self._logits

  @contextlib.contextmanager
  def taped(self, after: tf.Tensor):
    """Yields the taped logits with the tape recording.

    Under rematerialize_teacher the taped pass runs here, after `after`
    (h): without that dependency the graph could run it as early as the
    first one and keep its activations through the student's step, which is
    what rematerializing avoids.
    """
    if self._rematerialize:
      with self._tape, tf.control_dependencies([after]):
        self._logits = self._logits_of_one_pass()
    with self._tape:
      yield self._logits

  def gradient(self, loss: tf.Tensor, variables, loss_scale) -> list:
    """The gradient of `loss_scale`'s S * loss (loss_scale.py) on the tape."""
    return loss_scale.gradient(self._tape, loss, variables)

  def on_chunk(self, images_labeled, images_ori, images_aug, logits_ori):
    """The pass of one chunk: this one, which was made on its one chunk."""
    del images_labeled, images_ori, images_aug, logits_ori
    return self

  def _logits_of_one_pass(self) -> Dict[str, tf.Tensor]:
    """The teacher's logits {labeled, ori, aug} in one training-mode pass.

    Under 'no_grad' the pass is [x_l; x_u_aug] and 'ori' holds the untaped
    logits; else it is [x_l; x_u_ori; x_u_aug].
    """
    images_labeled, images_ori, images_aug = self._images
    local_labeled = tf.shape(images_labeled)[0]
    local_unlabeled = tf.shape(images_aug)[0]
    if self._logits_ori_untaped is not None:
      logits = self._training_pass([images_labeled, images_aug])
      labeled, aug = tf.split(logits, [local_labeled, local_unlabeled])
      return {'labeled': labeled, 'ori': self._logits_ori_untaped,
              'aug': aug}
    logits = self._training_pass([images_labeled, images_ori, images_aug])
    labeled, ori, aug = tf.split(
        logits, [local_labeled, local_unlabeled, local_unlabeled])
    return {'labeled': labeled, 'ori': ori, 'aug': aug}

  def _training_pass(self, images: Sequence[tf.Tensor]) -> tf.Tensor:
    """The teacher on the concatenated images, in training mode.

    Every pass that may move the moving statistics comes here, so frozen
    statistics (freeze_teacher_batch_norm_statistics) are put back in one
    place; not frozen, the list is empty and this adds no op.
    """
    with restored_afterwards(self._frozen_statistics):
      return self._teacher(tf.concat(images, axis=0), training=True)

  def _original_without_backward(self, images_ori: tf.Tensor) -> tf.Tensor:
    """The teacher's logits on x_u_ori in a pass of their own, no tape.

    Training mode (batch statistics, dropout), like the shared pass it
    replaces; the batch-norm moving statistics are restored afterwards, so
    they still move once per step (by the taped pass).
    """
    with restored_afterwards(self._batch_norm_statistics):
      logits = self._teacher(images_ori, training=True)
    return tf.stop_gradient(logits)


class ChunkedTeacherPass:
  """The teacher's pass under microbatches=K > 1, chunk by chunk.

  `forward()` runs one untaped, rematerialized pass per chunk and keeps only
  the logits (small: [rows, classes]), for the pseudo labels. Once h is
  known, the step asks `on_chunk(...)` for each chunk's own `TeacherPass`,
  whose taped pass repeats that chunk's first one (same masks: the chunks'
  seed states are set alike in both loops, microbatches.py) and whose
  gradient the step sums. Under 'no_grad' the original view's untaped
  logits of the first loop are handed to the chunk's pass, not recomputed.
  """

  def __init__(self, teacher: keras.Model, config: MplConfig,
               images_labeled: tf.Tensor, images_ori: tf.Tensor,
               images_aug: tf.Tensor, *, chunks: Microbatches,
               batch_norm_statistics: Sequence[tf.Variable],
               rng_states: Sequence[tf.Variable]):
    self._chunks = chunks
    self._images = (images_labeled, images_ori, images_aug)
    self._no_grad = config.teacher_original_pass == 'no_grad'
    config = dataclasses.replace(config, rematerialize_teacher=True)
    self._pass = lambda images, logits_ori=None: TeacherPass(
        teacher, config, *images, batch_norm_statistics=batch_norm_statistics,
        rng_states=rng_states, logits_ori=logits_ori)

  def forward(self) -> Dict[str, tf.Tensor]:
    """The first pass's logits {labeled, ori, aug}, chunk after chunk."""
    return self._chunks.concat(lambda images: self._pass(images).forward(),
                               self._images)

  def on_chunk(self, images_labeled, images_ori, images_aug,
               logits_ori) -> TeacherPass:
    """A chunk's own pass (inside the step's loop over chunks)."""
    return self._pass((images_labeled, images_ori, images_aug),
                      logits_ori if self._no_grad else None)
