"""Where a `fit()` stands in its data, saved with the weights: exact resumes.

Keras 3's BackupAndRestore saves the weights every `save_freq` batches, but
a resumed `fit()` starts the interrupted epoch again from its first batch (the
callback keeps only the epoch number, keras/src/callbacks/backup_and_restore.py),
and reads the dataset from a fresh iterator, from its beginning. A resumed MPL
run would then train again on batches its restored state has already seen,
and on other batches than the uninterrupted run.

`FitPosition` records where the training state stands: the epoch, the step
(MplStep's counter) at which that epoch began, and the step at which the
current dataset iterator began. `MetaPseudoLabels` saves these counters with
its weights. When weights are loaded at the start of a `fit()` (which is what
BackupAndRestore does, in `on_train_begin`), the first epoch of that fit:
  * reads and drops, from its new iterator, the batches the restored state
    had drawn from its own (the input pipeline's time, not training time);
  * runs the epoch's first calls, those the restored state already trained,
    without training (they return the running metrics, and callbacks see them
    as usual);
so the resumed fit trains on the batches the uninterrupted one would have.

This is exact when iterating the dataset afresh yields the same batches: a
finite dataset in a fixed order (read once per epoch), or an endless seeded
stream (`repeat()`, with `steps_per_epoch`), where Keras keeps one iterator
across epochs. main.py has no replay: its streams are functions of the step
and are rebuilt at the restored step.
"""

from typing import Callable, Dict, List, Optional

import tensorflow as tf

from mpl_tf.phase import read_step


def _known_batches(dataset) -> Optional[int]:
  """A tf.data dataset's finite number of batches, as Keras counts it."""
  if not isinstance(dataset, tf.data.Dataset):
    return None
  cardinality = int(dataset.cardinality())
  return cardinality if cardinality >= 0 else None


class FitPosition:
  """Epoch and iterator bookkeeping of `fit()`, and its replay on resume.

  Create it in the strategy's scope. `variables` are saved with the model;
  `start_fit`, `start_epoch` and `wrap` are called by MetaPseudoLabels.
  """

  def __init__(self):
    make = lambda name: tf.Variable(0, dtype=tf.int64, trainable=False,
                                    name=name)
    self.epoch = make('fit_epoch')
    self.epoch_start_step = make('fit_epoch_start_step')
    self.stream_start_step = make('fit_stream_start_step')
    # Set by MetaPseudoLabels.load_weights; cleared when a fit starts, so
    # only loads inside a fit (BackupAndRestore's) resume a position.
    self.restored = False
    self._iterator = None
    self._steps_per_epoch: Optional[int] = None
    self._dataset_batches: Optional[int] = None
    self._skip_batches = 0
    self._skip_calls = 0

  @property
  def variables(self) -> List[tf.Variable]:
    return [self.epoch, self.epoch_start_step, self.stream_start_step]

  def start_fit(self, dataset, steps_per_epoch: Optional[int]) -> None:
    self.restored = False
    self._iterator = None
    self._steps_per_epoch = steps_per_epoch
    self._dataset_batches = _known_batches(dataset)
    self._skip_batches = self._skip_calls = 0

  def _stream_goes_on(self, drawn: int) -> bool:
    """Whether Keras keeps the iterator into the next epoch (its rule in
    trainers/epoch_iterator.py: with steps_per_epoch, until the dataset's
    known number of batches is drawn)."""
    return self._steps_per_epoch is not None and (
        self._dataset_batches is None or drawn < self._dataset_batches)

  def start_epoch(self, epoch: int, step: int, steps_per_execution: int
                  ) -> None:
    """At each epoch's start: records it, or resumes a restored position."""
    if self.restored:
      self.restored = False
      saved_epoch = read_step(self.epoch)
      drawn = step - read_step(self.stream_start_step)
      if epoch == saved_epoch:
        # Resumed inside the epoch of the saved state (BackupAndRestore
        # with an integer save_freq): replay its stream, skip its calls.
        self._skip_batches = drawn
        done = step - read_step(self.epoch_start_step)
        self._skip_calls = done // steps_per_execution
        if done:
          print(f'MetaPseudoLabels: resuming epoch {epoch + 1} after its '
                f'first {done} steps (step {step}): skipping them, and '
                f'{drawn} batches of the new data iterator.')
        return
      if epoch == saved_epoch + 1 and self._stream_goes_on(drawn):
        self._skip_batches = drawn
        print(f'MetaPseudoLabels: resuming at epoch {epoch + 1} (step '
              f'{step}): skipping the {drawn} batches of the new data '
              f'iterator that the restored state has trained on.')
    self.epoch.assign(epoch)
    self.epoch_start_step.assign(step)

  def wrap(self, train_function: Callable, read_step_fn: Callable[[], int],
           running_logs: Callable[[], Dict[str, tf.Tensor]]) -> Callable:
    """Keras's train function, with the new-iterator and replay bookkeeping."""

    def train(iterator):
      if iterator is not self._iterator:
        self._iterator = iterator
        for drawn in range(self._skip_batches):
          try:
            next(iterator)
          except (StopIteration, tf.errors.OutOfRangeError):
            raise ValueError(
                f'MetaPseudoLabels: the restored state had drawn '
                f'{self._skip_batches} batches from its data iterator, but '
                f'the dataset of this fit() ends after {drawn}: resume with '
                f'the same dataset and fit() arguments.') from None
        self.stream_start_step.assign(read_step_fn() - self._skip_batches)
        self._skip_batches = 0
      if self._skip_calls:
        self._skip_calls -= 1
        return running_logs()
      return train_function(iterator)

    return train
