"""model_dir/curves.png: what a run's TensorBoard logs say, as one picture.

Top panel: validation top-1 against steps of every network the run
evaluated: the EMA student (the selected network), the teacher and the
student (with run.eval_all_networks), the finetuned student (after the MPL
steps) and the supervised baseline. Bottom panel: the teacher's feedback h
and the UDA mask rate (the fraction of unlabeled images whose confidence
passes uda_threshold), per device loop.

Drawn from the event files the loop already writes (logs/train, logs/eval
and the phases' own logs/ directories), not from a state of its own, so any
run, also one resumed many times or read from a bucket, can be drawn. After
a resumption the re-run steps are logged twice; the later value wins, as
in TensorBoard.
"""

import io
import os
from typing import Dict, List, Tuple

import tensorflow as tf

# (directory under model_dir, tag, label) of each validation curve.
VALIDATION_CURVES = (
    ('logs/eval', 'validation/top1', 'student (EMA)'),
    ('logs/eval', 'validation/top1_student', 'student'),
    ('logs/eval', 'validation/top1_teacher', 'teacher'),
    ('finetune/logs/eval', 'validation/top1', 'student, finetuned'),
    ('supervised/logs/eval', 'validation/top1', 'supervised'),
)
TRAINING_CURVES = (('mpl/h', 'h (teacher feedback)'),
                   ('teacher/uda_mask_rate', 'UDA mask rate'))


def read_scalars(directory: str) -> Dict[str, List[Tuple[int, float]]]:
  """{tag: [(step, value)] sorted by step} from a directory's event files."""
  by_tag: Dict[str, Dict[int, float]] = {}
  # Event files are named by creation time: later files overwrite steps.
  for path in sorted(tf.io.gfile.glob(os.path.join(directory,
                                                   'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('tensor'):
          if value.metadata.plugin_data.plugin_name != 'scalars':
            continue  # images (the inputs written once), histograms
          number = float(tf.make_ndarray(value.tensor))
        elif value.HasField('simple_value'):
          number = float(value.simple_value)
        else:
          continue
        by_tag.setdefault(value.tag, {})[int(event.step)] = number
  return {tag: sorted(points.items()) for tag, points in by_tag.items()}


def _offset(points, offset: int):
  return [(step + offset, value) for step, value in points]


def write_curves(model_dir: str, mpl_steps: int, path: str = '') -> str:
  """Draws the run's curves to `path` (default model_dir/curves.png).

  `mpl_steps` places the finetuning curve after the MPL steps. Returns the
  path written, or '' when the logs hold no validation value yet.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  logs = {}
  for directory in {entry[0] for entry in VALIDATION_CURVES} | {'logs/train'}:
    logs[directory] = read_scalars(os.path.join(model_dir, directory))
  curves = []
  for directory, tag, label in VALIDATION_CURVES:
    points = logs[directory].get(tag, [])
    if directory.startswith('finetune'):
      points = _offset(points, mpl_steps)
    if points:
      curves.append((label, points))
  if not curves:
    return ''
  figure, (top, bottom) = pyplot.subplots(
      2, 1, figsize=(8, 6.5), sharex=True,
      gridspec_kw={'height_ratios': [3, 2]})
  for label, points in curves:
    steps, values = zip(*points)
    top.plot(steps, values, marker='o', markersize=3, label=label)
  top.set_ylabel('validation top-1')
  top.grid(alpha=0.3)
  top.legend(loc='lower right', fontsize=9)
  top.set_title(f'{os.path.basename(os.path.normpath(model_dir))}: '
                f'validation accuracy and the teacher\'s signals')
  colors = ('tab:purple', 'tab:green')
  axis = bottom
  for index, (tag, label) in enumerate(TRAINING_CURVES):
    points = logs['logs/train'].get(tag, [])
    if not points:
      continue
    if index:
      axis = bottom.twinx()
    steps, values = zip(*points)
    axis.plot(steps, values, color=colors[index], label=label)
    axis.set_ylabel(label, color=colors[index])
  bottom.axhline(0.0, color='gray', linewidth=0.5)
  bottom.set_xlabel('step (finetuning after the MPL steps)')
  bottom.grid(alpha=0.3)
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=110)
  pyplot.close(figure)
  path = path or os.path.join(model_dir, 'curves.png')
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(buffer.getvalue())
  return path

