"""One step of Meta Pseudo Labels, following the paper's Algorithm 1 line by line.

Lines quoted from Algorithm 1 (Pham et al., CVPR 2021, "Meta Pseudo Labels
applied to a teacher trained with UDA") are marked `# Algorithm 1:`; the code
under each one does exactly that line. The step knows nothing of files,
loops or checkpoints: it takes one batch, updates both networks once and
returns scalars to log.

Choices the paper leaves open or the released code makes differently are
fields of `mpl_tf.config.MplConfig`, described there once (the flags' help
comes from those descriptions), never constants here.

How this scales against the exact meta-gradient (tests/test_gradient_identity):
CE here is a batch mean over the global unlabeled batch of size N, while
-log P_T(y_hat | x_u) of the identity is a sum over that batch, so
h * grad CE(y_hat, T(x_u)) is a one-sample estimate of (1/N) times
grad_T L_l(theta_S'(theta_T)).

Structure shared with the released code (spec section 3.1): one teacher
forward on [x_l; x_u_ori; x_u_aug]; one student forward on [x_u; x_l] whose
labeled half gives L_l(old) and shares the batch-norm batch; the student's
update and its EMA; a second student forward on x_l at the new weights (batch
statistics, dropout on) that gives L_l(new) and, for 'exact', its gradient;
then the teacher's update. That second forward is a measurement, so it does
not move the student's batch-norm moving statistics (as in the released code).
By default the teacher's moving statistics are updated by its training pass,
once per step; the released graph never updates them (its update ops are
filtered to the student's scope), which
freeze_teacher_batch_norm_statistics reproduces (teacher_pass.py). They only
matter for evaluating the teacher, for diagnosis.

microbatches=K (mpl_tf/microbatches.py) runs the blocks that read the batch
on its K chunks in turn, exactly as K times the replicas would: a first loop
of untaped teacher passes for the pseudo labels, one of the student's
pseudo-label gradients and L_l(old), one student update, one loop for
L_l(new) and its gradient at the new weights, h once from those global sums,
and one loop of rematerialized teacher passes whose gradients are summed
before the teacher's one update. K=1 is the step as it was, op for op.
"""

import functools
from typing import Dict, Optional, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from mpl_tf import ema
from mpl_tf import health
from mpl_tf import loss_scale
from mpl_tf import losses
from mpl_tf import optim
from mpl_tf.config import MplConfig, OptimConfig
from mpl_tf.models import (batch_norm_statistics, normalization_weights,
                           random_states, restored_afterwards)
from mpl_tf.microbatches import Microbatches
from mpl_tf.teacher_pass import ChunkedTeacherPass, TeacherPass

SUM = tf.distribute.ReduceOp.SUM
# The metrics whose finiteness decides the step, in the order a NaN would
# spread: the teacher's forward, the student's update, then the feedback and
# the teacher's update.
_GUARDED_METRICS = ('teacher/supervised_loss', 'teacher/uda_loss',
                    'student/pseudo_label_loss', 'student/grad_norm',
                    'student/labeled_loss_new', 'mpl/h', 'teacher/grad_norm')
# Those computed before any gradient: not finite is never a loss-scale
# overflow (loss_scale.py).
_FORWARD_METRICS = _GUARDED_METRICS[:3]


def feedback_coefficient(feedback: str, sign: str, student_lr,
                         labeled_grads_new=None, pseudo_label_grads=None,
                         labeled_loss_old=None, labeled_loss_new=None):
  """The teacher's feedback coefficient h, before any baseline.

  Args:
    feedback: 'exact' uses the gradients, 'taylor' the losses.
    sign: 'paper' or 'released_code' (the negation).
    student_lr: eta_S, the rate the student's update used.
    labeled_grads_new: grad L_l at the student's new weights (global).
    pseudo_label_grads: grad CE(y_hat, S(x_u)) at the old weights (global).
    labeled_loss_old, labeled_loss_new: L_l before and after the update.

  Returns:
    'exact': eta_S * <labeled_grads_new, pseudo_label_grads> (Equation 12);
    'taylor': L_l(old) - L_l(new), its first-order equivalent; negated for
    sign='released_code'.
  """
  if feedback == 'exact':
    grad_dot = tf.add_n([
        tf.reduce_sum(new * old)
        for new, old in zip(labeled_grads_new, pseudo_label_grads)])
    h = tf.cast(student_lr, grad_dot.dtype) * grad_dot
  elif feedback == 'taylor':
    h = labeled_loss_old - labeled_loss_new
  else:
    raise ValueError(f'feedback={feedback!r} is not exact or taylor.')
  if sign == 'paper':
    return h
  if sign == 'released_code':
    return -h
  raise ValueError(f'feedback_sign={sign!r} is not paper or released_code.')


class MplStep:
  """Owns the step counter and the h baseline; updates teacher and student.

  Call it inside `strategy.run` (or directly on one device) with a batch dict:
    labeled_images [b, ...], labels [b] int, unlabeled_images_ori [b*mu, ...],
    unlabeled_images_aug [b*mu, ...]
  where b is this replica's share of the global labeled batch. `seed` seeds
  the pseudo-label draws with the step counter: an int, or an int64
  tf.Variable, so that one traced step serves runs of many seeds
  (experiments/two_moon_trainers.py).
  """

  def __init__(self, mpl_config: MplConfig, optim_config: OptimConfig,
               teacher: keras.Model, student: keras.Model,
               teacher_optimizer: keras.optimizers.Optimizer,
               student_optimizer: keras.optimizers.Optimizer, *,
               global_labeled_batch: int, global_unlabeled_batch: int,
               ema_student: Optional[keras.Model] = None,
               seed: Union[int, tf.Variable] = 0,
               nonfinite: str = 'stop'):
    self.config = mpl_config
    self.optim_config = optim_config
    self.teacher = teacher
    self.student = student
    self.ema_student = ema_student
    self.teacher_optimizer = teacher_optimizer
    self.student_optimizer = student_optimizer
    self.global_labeled_batch = global_labeled_batch
    self.global_unlabeled_batch = global_unlabeled_batch
    self.seed = seed
    # t of Algorithm 1: advanced once per step, after the teacher's update.
    self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
    # The released code's baseline starts at a Glorot-uniform draw for a
    # scalar, U(-sqrt(3), sqrt(3)); 'zero' starts it at 0.
    if mpl_config.baseline_init == 'uniform_sqrt3':
      # (An int seed here; a tf.Variable seed, which lets one traced step
      # serve runs of many seeds, goes with baseline_init='zero'.)
      initial = np.random.default_rng(int(seed)).uniform(-np.sqrt(3),
                                                         np.sqrt(3))
    else:
      initial = 0.0
    self.baseline = tf.Variable(initial, dtype=tf.float32, trainable=False,
                                name='h_baseline')
    self._teacher_no_decay = normalization_weights(teacher)
    self._student_no_decay = normalization_weights(student)
    self._student_bn_statistics = batch_norm_statistics(student)
    self._teacher_bn_statistics = batch_norm_statistics(teacher)
    self._teacher_rng_states = random_states(teacher)
    # The batch's blocks, on the batch or on K chunks (microbatches.py).
    self.chunks = Microbatches(mpl_config.microbatches, (teacher, student))
    # float16 networks only (else inactive): loss_scale.py.
    self.student_scale = loss_scale.DynamicLossScale.for_network(
        student, 'student')
    self.teacher_scale = loss_scale.DynamicLossScale.for_network(
        teacher, 'teacher')
    self.guard = health.NonFiniteGuard(nonfinite, health.float_state(
        teacher, student, ema_student, teacher_optimizer, student_optimizer,
        self.baseline), loss_scales=(self.student_scale, self.teacher_scale))

  def checkpoint_items(self) -> Dict[str, tf.Module]:
    """Everything the step changes, for one tf.train.Checkpoint."""
    items = dict(teacher=self.teacher, student=self.student,
                 teacher_optimizer=self.teacher_optimizer,
                 student_optimizer=self.student_optimizer,
                 step=self.step, h_baseline=self.baseline,
                 health=self.guard.checkpoint_item())
    if self.ema_student is not None:
      items['ema_student'] = self.ema_student
    return items

  def __call__(self, batch: Dict[str, tf.Tensor]
               ) -> Tuple[Dict[str, tf.Tensor], Dict[str, tf.Tensor]]:
    """Runs one MPL step on this replica's batch, under the non-finite guard.

    Returns:
      (metrics, outputs): `metrics` are scalars identical on every replica
      where they are global (losses, h) and local where they are fractions
      (mask rates); `outputs` holds this replica's pseudo label ids.
    """
    metrics, outputs = self.guard.run(
        self.step, lambda: self._algorithm_1(batch), _GUARDED_METRICS,
        forward=_FORWARD_METRICS)
    self.step.assign_add(1)
    return metrics, outputs

  def _algorithm_1(self, batch: Dict[str, tf.Tensor]):
    """Algorithm 1, one line of code per line of the paper where it can be.

    The lines that read the batch (the networks' passes and their losses)
    are blocks of one chunk, `self.chunks` runs them: on the batch, once
    (microbatches=1), or on its K chunks in turn, summed (microbatches.py).
    """
    cfg = self.config
    replica_context = tf.distribute.get_replica_context()
    n_labeled, n_unlabeled = self.global_labeled_batch, self.global_unlabeled_batch
    chunks = self.chunks

    # Algorithm 1: Sample an unlabeled example x_u and a labeled example
    # Algorithm 1:   x_l, y_l
    images_labeled = batch['labeled_images']
    labels = tf.cast(batch['labels'], tf.int32)
    images_ori = batch['unlabeled_images_ori']
    images_aug = batch['unlabeled_images_aug']
    images_student = images_aug if cfg.student_view == 'aug' else images_ori
    local_unlabeled = tf.shape(images_ori)[0]

    # The teacher's forward pass on [x_l; x_u_ori; x_u_aug], taped; its
    # losses are added to the same tape once h is known (teacher_pass.py;
    # K chunks: untaped, and repeated taped for each chunk after h).
    teacher_pass = self._teacher_pass(images_labeled, images_ori, images_aug)
    teacher_logits = teacher_pass.forward()

    # Algorithm 1: Sample a pseudo label y_hat_u ~ P(. | x_u; theta_T)
    # (each replica draws the noise of its own rows, keyed by their rows in
    # the global batch: any replica layout draws the same labels).
    first_row = replica_context.replica_id_in_sync_group * local_unlabeled
    sample_seed = tf.stack([self.step,
                            tf.convert_to_tensor(self.seed, tf.int64)])
    pseudo_targets, pseudo_label_ids = losses.pseudo_labels(
        teacher_logits[cfg.student_view], cfg.pseudo_label, sample_seed,
        first_row=first_row)

    # Algorithm 1: Update the student using the pseudo label y_hat_u:
    # Algorithm 1:   theta_S(t+1) = theta_S(t)
    # Algorithm 1:       - eta_S grad_S CE(y_hat_u, S(x_u; theta_S))|theta_S(t)
    student_vars = self.student.trainable_variables

    def student_gradient(chunk):   # per chunk; `chunks.sum` adds them up
      images_student, images_labeled, labels, pseudo_targets = chunk
      local_labeled = tf.shape(images_labeled)[0]
      local_unlabeled = tf.shape(images_student)[0]
      with tf.GradientTape() as student_tape:
        student_logits = self.student(
            tf.concat([images_student, images_labeled], axis=0), training=True)
        student_logits_unlabeled, student_logits_labeled_old = tf.split(
            student_logits, [local_unlabeled, local_labeled])
        student_pseudo_label_loss = losses.cross_entropy(
            pseudo_targets, student_logits_unlabeled, n_unlabeled,
            cfg.label_smoothing)
      return (self.student_scale.gradient(
                  student_tape, student_pseudo_label_loss, student_vars),
              student_pseudo_label_loss, losses.cross_entropy(
                  losses.one_hot(labels, student_logits_labeled_old),
                  tf.stop_gradient(student_logits_labeled_old), n_labeled))

    student_grads, student_pseudo_label_loss, student_labeled_loss_old = (
        chunks.sum(student_gradient, (images_student, images_labeled, labels,
                                      pseudo_targets)))
    student_grads = self.student_scale.unscaled(
        replica_context.all_reduce(SUM, student_grads))
    student_labeled_loss_old = replica_context.all_reduce(
        SUM, student_labeled_loss_old)
    student_lr = tf.cast(self.student_optimizer.learning_rate, tf.float32)
    student_grad_norm = optim.apply_global_gradients(
        self.student_optimizer, self.optim_config, student_grads,
        student_vars, self._student_no_decay)
    if self.ema_student is not None:
      ema.update(self.ema_student, self.student,
                 ema.decay_at(self.step, self.optim_config.ema_decay))

    # Algorithm 1: Compute the teacher's feedback coefficient as in Equation 12:
    # Algorithm 1:   h = eta_S * (grad_S' CE(y_l, S(x_l; theta_S(t+1))))^T
    # Algorithm 1:         * grad_S CE(y_hat_u, S(x_u; theta_S(t)))
    student_labeled_loss_new, student_labeled_grads_new = (
        self._labeled_loss_at_new_weights(images_labeled, labels))
    h_raw = feedback_coefficient(
        cfg.feedback, cfg.feedback_sign, student_lr,
        labeled_grads_new=student_labeled_grads_new,
        pseudo_label_grads=student_grads,
        labeled_loss_old=student_labeled_loss_old,
        labeled_loss_new=student_labeled_loss_new)
    h = tf.stop_gradient(self._minus_baseline(h_raw))
    uda_weight = losses.uda_weight(self.step, cfg.uda_weight, cfg.uda_steps)
    teacher_vars = self.teacher.trainable_variables

    def teacher_gradient(chunk):   # per chunk; `chunks.sum` adds them up
      labels, pseudo_targets, *images_and_logits_ori = chunk
      chunk_pass = teacher_pass.on_chunk(*images_and_logits_ori)
      with chunk_pass.taped(after=h) as teacher_logits:
        # Algorithm 1: Compute the teacher's gradient from the student's feedback:
        # Algorithm 1:   g_T(t) =
        # Algorithm 1:       h * grad_T CE(y_hat_u, T(x_u; theta_T))|theta_T(t)
        # ('soft' makes this CE(stop_grad(softmax(z)), z): zero gradient.)
        teacher_mpl_term = losses.cross_entropy(
            pseudo_targets, teacher_logits[cfg.student_view], n_unlabeled)
        # Algorithm 1: Compute the teacher's gradient on labeled data:
        # Algorithm 1:   g_T,supervised(t) =
        # Algorithm 1:       grad_T CE(y_l, T(x_l; theta_T))|theta_T(t)
        teacher_supervised_loss = losses.cross_entropy(
            losses.one_hot(labels, teacher_logits['labeled']),
            teacher_logits['labeled'], n_labeled, cfg.label_smoothing)
        # Algorithm 1: Compute the teacher's gradient on the UDA loss with
        # Algorithm 1:   unlabeled data:
        # Algorithm 1:   g_T,UDA(t) =
        # Algorithm 1:       grad_T CE(StopGradient(T(x_u)), T(RandAugment(x_u)))
        # Algorithm 1:       |theta_T(t)
        #   (weighted by its linear ramp)
        teacher_uda_loss, uda_mask_rate = losses.uda_consistency(
            teacher_logits['ori'], teacher_logits['aug'], cfg.uda_temperature,
            cfg.uda_threshold, n_unlabeled)
        teacher_loss = (cfg.mpl_weight * tf.cast(h, teacher_mpl_term.dtype) *
                        teacher_mpl_term + teacher_supervised_loss +
                        tf.cast(uda_weight, teacher_uda_loss.dtype) *
                        teacher_uda_loss)
      # Mean entropy of P_T(.|x_u): the soft label's CE with itself.
      teacher_logits_unlabeled = teacher_logits[cfg.student_view]
      teacher_entropy = losses.cross_entropy(
          tf.nn.softmax(teacher_logits_unlabeled), teacher_logits_unlabeled,
          n_unlabeled)
      return (chunk_pass.gradient(teacher_loss, teacher_vars,
                                  self.teacher_scale),
              teacher_mpl_term, teacher_supervised_loss, teacher_uda_loss,
              uda_mask_rate, teacher_entropy)

    (teacher_grads, teacher_mpl_term, teacher_supervised_loss,
     teacher_uda_loss, uda_mask_rate, teacher_entropy) = chunks.sum(
         teacher_gradient, (labels, pseudo_targets, images_labeled,
                            images_ori, images_aug, teacher_logits['ori']))
    uda_mask_rate = chunks.mean(uda_mask_rate)
    # Algorithm 1: Update the teacher:
    # Algorithm 1:   theta_T(t+1) = theta_T(t)
    # Algorithm 1:       - eta_T * (g_T(t) + g_T,supervised(t) + g_T,UDA(t))
    teacher_grads = self.teacher_scale.unscaled(
        replica_context.all_reduce(SUM, teacher_grads))
    teacher_lr = tf.cast(self.teacher_optimizer.learning_rate, tf.float32)
    teacher_grad_norm = optim.apply_global_gradients(
        self.teacher_optimizer, self.optim_config, teacher_grads,
        teacher_vars, self._teacher_no_decay)

    metrics = self._metrics(
        teacher_supervised_loss=teacher_supervised_loss,
        teacher_uda_loss=teacher_uda_loss, uda_mask_rate=uda_mask_rate,
        uda_weight=uda_weight, teacher_mpl_term=teacher_mpl_term,
        teacher_entropy=teacher_entropy,
        teacher_grad_norm=teacher_grad_norm, teacher_lr=teacher_lr,
        student_pseudo_label_loss=student_pseudo_label_loss,
        student_labeled_loss_old=student_labeled_loss_old,
        student_labeled_loss_new=student_labeled_loss_new,
        student_grad_norm=student_grad_norm, student_lr=student_lr,
        h_raw=h_raw, h=h)
    return metrics, {'pseudo_label_ids': pseudo_label_ids}

  def _teacher_pass(self, images_labeled, images_ori, images_aug):
    """The teacher's pass: TeacherPass, or ChunkedTeacherPass under K > 1."""
    make = TeacherPass if self.chunks.count == 1 else functools.partial(
        ChunkedTeacherPass, chunks=self.chunks)
    return make(self.teacher, self.config, images_labeled, images_ori,
                images_aug, batch_norm_statistics=self._teacher_bn_statistics,
                rng_states=self._teacher_rng_states)

  def _minus_baseline(self, h_raw: tf.Tensor) -> tf.Tensor:
    """h minus the moving average of h (baseline_decay > 0), else h."""
    decay = self.config.baseline_decay
    if decay <= 0:
      return h_raw
    # The released order: move the average first, then subtract it.
    self.baseline.assign(decay * self.baseline +
                         (1.0 - decay) * tf.cast(h_raw, tf.float32))
    return h_raw - tf.cast(self.baseline, h_raw.dtype)

  def _metrics(self, *, teacher_supervised_loss, teacher_uda_loss,
               uda_mask_rate, uda_weight, teacher_mpl_term,
               teacher_entropy, teacher_grad_norm, teacher_lr,
               student_pseudo_label_loss, student_labeled_loss_old,
               student_labeled_loss_new, student_grad_norm, student_lr,
               h_raw, h) -> Dict[str, tf.Tensor]:
    """Every scalar the step logs, in float32, global where it is a loss.

    Losses are this replica's share of a global mean, so they are summed
    across replicas here; the rest is already global, or local by design.
    """
    replica_context = tf.distribute.get_replica_context()
    f32 = lambda x: tf.cast(x, tf.float32)
    global_sum = lambda x: replica_context.all_reduce(SUM, f32(x))
    return {
        'teacher/supervised_loss': global_sum(teacher_supervised_loss),
        'teacher/uda_loss': global_sum(teacher_uda_loss),
        'teacher/uda_mask_rate': f32(uda_mask_rate),
        'teacher/uda_weight': f32(uda_weight),
        'teacher/mpl_term': global_sum(teacher_mpl_term),
        'teacher/entropy': global_sum(teacher_entropy),
        'teacher/grad_norm': f32(teacher_grad_norm),
        'teacher/learning_rate': teacher_lr,
        'student/pseudo_label_loss': global_sum(student_pseudo_label_loss),
        'student/labeled_loss_old': f32(student_labeled_loss_old),
        'student/labeled_loss_new': f32(student_labeled_loss_new),
        'student/grad_norm': f32(student_grad_norm),
        'student/learning_rate': student_lr,
        'mpl/h_raw': f32(h_raw),
        'mpl/h': f32(h),
        'mpl/baseline': tf.identity(self.baseline),
    }

  def _labeled_loss_at_new_weights(self, images_labeled, labels):
    """L_l(theta_S') summed across replicas, and its gradient if 'exact'.

    Runs in training mode like the released code's second forward pass, but
    restores the batch-norm moving statistics afterwards: this pass measures
    the student, it does not train it.
    """
    student_vars = self.student.trainable_variables
    exact = self.config.feedback == 'exact'

    def loss_and_gradient(chunk):
      images_labeled, labels = chunk
      with restored_afterwards(self._student_bn_statistics):
        with tf.GradientTape() as tape:
          logits = self.student(images_labeled, training=True)
          loss = losses.cross_entropy(losses.one_hot(labels, logits), logits,
                                      self.global_labeled_batch)
      return ((loss, self.student_scale.gradient(tape, loss, student_vars))
              if exact else (loss,))

    loss, *grads = self.chunks.sum(loss_and_gradient, (images_labeled, labels))
    replica_context = tf.distribute.get_replica_context()
    loss_sum = replica_context.all_reduce(SUM, loss)
    if not exact:
      return loss_sum, None
    grads = self.student_scale.unscaled(
        replica_context.all_reduce(SUM, grads[0]))
    return loss_sum, grads
