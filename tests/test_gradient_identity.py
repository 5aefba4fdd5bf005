"""The identity behind Algorithm 1, checked against an unrolled meta-gradient.

For a teacher T and student S, one soft-label SGD step of the student,
  theta_S' = theta_S - eta_S * grad_S CE(softmax(T(x_u)), S(x_u)),
gives a labeled loss L_l(theta_S') that depends on the teacher. Because the
soft-label CE is the expectation over y_hat ~ T of the hard-label CE, the
log-derivative trick gives exactly (no approximation):
  grad_T L_l(theta_S') =
    eta_S * E_{y_hat ~ T}[(grad L_l(theta_S')^T grad_S CE(y_hat, S(x_u)))
                          * grad_T(-log P_T(y_hat | x_u))],
where the CEs are batch means and -log P_T(y_hat | x_u) is summed over the
batch. The bracketed scalar is the library's h ('exact', paper sign), and
-log P_T(y_hat | x_u) = N * CE(y_hat, T(x_u)) with the library's batch-mean CE:
the step's teacher term h * grad CE(y_hat, T(x_u)) is a one-sample estimate of
(1/N) * grad_T L_l(theta_S').

The right-hand side is computed by enumerating all K^N label assignments and
uses the library's feedback_coefficient and cross_entropy, so a flipped sign
or a dropped eta_S in the library fails these tests.
"""

import itertools

import numpy as np
import tensorflow as tf

from mpl_tf import losses
from mpl_tf.mpl_step import feedback_coefficient
from tests.tiny_models import keras_mlp, mlp_apply, random_batch, snapshot

INPUT_DIM, HIDDEN, NUM_CLASSES = 4, 5, 3
NUM_UNLABELED, NUM_LABELED = 3, 4
STUDENT_LR = 0.5


def _setup(seed=0):
  teacher = snapshot(keras_mlp(INPUT_DIM, HIDDEN, NUM_CLASSES, seed, 'teacher'))
  student = snapshot(keras_mlp(INPUT_DIM, HIDDEN, NUM_CLASSES, seed + 10,
                               'student'))
  batch = random_batch(seed, NUM_LABELED, NUM_UNLABELED, INPUT_DIM, NUM_CLASSES)
  return teacher, student, batch


def _labeled_loss(student_weights, batch):
  logits = mlp_apply(student_weights, batch['labeled_images'])
  return losses.cross_entropy(losses.one_hot(batch['labels'], logits), logits,
                              NUM_LABELED)


def _student_ce(student_weights, targets, x_unlabeled):
  logits = mlp_apply(student_weights, x_unlabeled)
  return losses.cross_entropy(targets, logits, NUM_UNLABELED)


def unrolled_meta_gradient(teacher, student, batch, student_lr):
  """grad_T L_l(theta_S - eta_S grad_S CE(softmax(T(x_u)), S(x_u))) by tapes."""
  x_unlabeled = batch['unlabeled_images_aug']
  teacher_vars = [tf.Variable(w) for w in teacher]
  with tf.GradientTape() as outer:
    soft_targets = tf.nn.softmax(mlp_apply(teacher_vars, x_unlabeled))
    with tf.GradientTape() as inner:
      inner.watch(student)
      # Written out (not losses.cross_entropy, which stops the gradient of
      # its targets): the targets must stay differentiable in the teacher.
      student_log_probs = tf.nn.log_softmax(mlp_apply(student, x_unlabeled))
      soft_loss = -tf.reduce_sum(soft_targets * student_log_probs) / NUM_UNLABELED
    grads = inner.gradient(soft_loss, student)
    new_student = [w - student_lr * g for w, g in zip(student, grads)]
    labeled_loss = _labeled_loss(new_student, batch)
  return outer.gradient(labeled_loss, teacher_vars)


def enumerated_estimator(teacher, student, batch, student_lr):
  """eta_S * E_{y_hat}[h_dot(y_hat) grad_T(-log P_T(y_hat))], by enumeration."""
  x_unlabeled = batch['unlabeled_images_aug']
  teacher_logits = mlp_apply(teacher, x_unlabeled)
  probs = tf.nn.softmax(teacher_logits).numpy()
  # theta_S' is the soft-label update (the same for every y_hat).
  with tf.GradientTape() as tape:
    tape.watch(student)
    soft_loss = _student_ce(student, tf.nn.softmax(teacher_logits), x_unlabeled)
  soft_grads = tape.gradient(soft_loss, student)
  new_student = [w - student_lr * g for w, g in zip(student, soft_grads)]
  with tf.GradientTape() as tape:
    tape.watch(new_student)
    labeled_loss = _labeled_loss(new_student, batch)
  labeled_grads_new = tape.gradient(labeled_loss, new_student)

  total = [tf.zeros_like(w) for w in teacher]
  for assignment in itertools.product(range(NUM_CLASSES), repeat=NUM_UNLABELED):
    label_ids = tf.constant(assignment, dtype=tf.int32)
    probability = np.prod([probs[i, k] for i, k in enumerate(assignment)])
    with tf.GradientTape() as tape:
      tape.watch(student)
      hard_loss = _student_ce(student, losses.one_hot(label_ids, teacher_logits),
                              x_unlabeled)
    hard_grads = tape.gradient(hard_loss, student)
    h = feedback_coefficient('exact', 'paper', student_lr,
                             labeled_grads_new=labeled_grads_new,
                             pseudo_label_grads=hard_grads)
    with tf.GradientTape() as tape:
      tape.watch(teacher)
      logits = mlp_apply(teacher, x_unlabeled)
      # -log P_T(y_hat | x_u), summed over the batch = N * batch-mean CE.
      neg_log_prob = NUM_UNLABELED * losses.cross_entropy(
          losses.one_hot(label_ids, logits), logits, NUM_UNLABELED)
    score = tape.gradient(neg_log_prob, teacher)
    total = [t + probability * h * s for t, s in zip(total, score)]
  return total


class GradientIdentityTest(tf.test.TestCase):

  def test_enumeration_equals_unrolled_meta_gradient(self):
    for seed in (0, 1):
      teacher, student, batch = _setup(seed)
      expected = unrolled_meta_gradient(teacher, student, batch, STUDENT_LR)
      estimated = enumerated_estimator(teacher, student, batch, STUDENT_LR)
      flat_expected = tf.concat([tf.reshape(g, [-1]) for g in expected], 0)
      flat_estimated = tf.concat([tf.reshape(g, [-1]) for g in estimated], 0)
      # Not a trivial zero: the meta-gradient is clearly non-zero.
      self.assertGreater(float(tf.norm(flat_expected)), 1e-3)
      self.assertAllClose(flat_estimated, flat_expected, rtol=1e-6, atol=1e-12)

  def test_taylor_feedback_approaches_exact_quadratically(self):
    teacher, student, batch = _setup(0)
    x_unlabeled = batch['unlabeled_images_aug']
    label_ids = tf.argmax(mlp_apply(teacher, x_unlabeled), -1, output_type=tf.int32)
    targets = losses.one_hot(label_ids, mlp_apply(teacher, x_unlabeled))
    with tf.GradientTape() as tape:
      tape.watch(student)
      pseudo_loss = _student_ce(student, targets, x_unlabeled)
    pseudo_grads = tape.gradient(pseudo_loss, student)
    loss_old = _labeled_loss(student, batch)
    with tf.GradientTape() as tape:
      tape.watch(student)
      loss_at_old = _labeled_loss(student, batch)
    grad_dot = float(tf.add_n([tf.reduce_sum(a * b) for a, b in zip(
        tape.gradient(loss_at_old, student), pseudo_grads)]))

    gaps = []
    for student_lr in (0.2, 0.1, 0.05, 0.025):
      new_student = [w - student_lr * g for w, g in zip(student, pseudo_grads)]
      with tf.GradientTape() as tape:
        tape.watch(new_student)
        loss_new = _labeled_loss(new_student, batch)
      grads_new = tape.gradient(loss_new, new_student)
      h_exact = float(feedback_coefficient(
          'exact', 'paper', student_lr, labeled_grads_new=grads_new,
          pseudo_label_grads=pseudo_grads))
      h_taylor = float(feedback_coefficient(
          'taylor', 'paper', student_lr, labeled_loss_old=loss_old,
          labeled_loss_new=loss_new))
      # With the paper's sign, h has the sign of the gradient dot product.
      self.assertEqual(np.sign(h_taylor), np.sign(grad_dot))
      self.assertEqual(np.sign(h_exact), np.sign(grad_dot))
      released = float(feedback_coefficient(
          'taylor', 'released_code', student_lr, labeled_loss_old=loss_old,
          labeled_loss_new=loss_new))
      self.assertEqual(released, -h_taylor)
      gaps.append(abs(h_taylor - h_exact))
    # h itself is O(eta_S); the gap is O(eta_S^2): halving eta_S divides it
    # by about four.
    for larger, smaller in zip(gaps, gaps[1:]):
      self.assertBetween(larger / smaller, 3.0, 5.0)
    self.assertLess(gaps[-1], 0.05 * abs(grad_dot * 0.025))
