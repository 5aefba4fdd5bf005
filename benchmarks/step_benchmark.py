"""Benchmark: the training steps against this machine's measured matmul peak.

  .venv/bin/python benchmarks/step_benchmark.py                 # default grid
  .venv/bin/python benchmarks/step_benchmark.py --shapes=small  # minutes
  .venv/bin/python benchmarks/step_benchmark.py --cases=mpl_exact:64x7:float32:noxla
  .venv/bin/python benchmarks/step_benchmark.py --malloc=on,off --cases=...
  .venv/bin/python benchmarks/step_benchmark.py --model=wrn-10-2 --image_size=16 \
      --cases=mpl_exact:8x3:float32:noxla     # the README demo's step
  .venv/bin/python benchmarks/step_benchmark.py --skip_pipeline --steps=2 \
      --cases=mpl_exact:big:float32:noxla --microbatches=1,2,4,8
  .venv/bin/python benchmarks/step_benchmark.py --batch_norm_kernel=keras \
      --cases=mpl_exact:8x7:float32:noxla   # Keras's unfused batch norm

Each case runs in its own fresh Python process, so its peak RSS, its first
call (trace) and its allocator state are its own. A case is
`step:BxMU:precision:xla[:kK]`:

  step       supervised | uda | mpl_exact | mpl_taylor |
             mpl_exact_ori_no_grad | mpl_exact_rematerialized (the
             library's SupervisedStep, UdaStep, MplStep with
             feedback=exact|taylor; exact with
             teacher_original_pass=no_grad, the cheaper, non-default pass;
             exact with rematerialize_teacher, same numbers, less memory).
  BxMU       labeled batch B and ratio mu (unlabeled batch B*mu per view);
             'small' = 16x2, 'big' = 64x7.
  precision  float32 | mixed_bfloat16 (ModelConfig.precision).
  xla        noxla | xla (the train loop's jit_compile).
  kK         optional: MplConfig.microbatches=K, each step's batch in K
             chunks in turn (mpl_tf/microbatches.py), with non-synchronized
             batch norm, as K > 1 needs (K=1 too: the same networks for
             every K). `--microbatches=1,2,4,8` adds it to every case.

The step runs inside the product's device loop (device_loop.make_train_loop, the
same tf.function, strategy.run and metric reduction that training uses) on
WRN-28-2, CIFAR shapes (32x32x3, 10 classes; --model and --image_size
change them), reading one constant batch
from a repeated dataset, so the input pipeline costs nothing here; its own
rate is measured separately (benchmarks/input_pipeline.py's stream) and
printed beside the steps' consumption.

Per case it reports: the first call (trace + compile + one step), the
steady-state seconds per step over --steps steps (after one warm-up call),
images per step and per second, FLOPs per step, achieved GFLOP/s, the
process's fp32 (and, for bf16 cases, bf16) matmul peak measured in the same
process right before the step, the ratio, user and system CPU seconds per
step and minor page faults per step (getrusage), and peak RSS (ru_maxrss,
the whole process). `--malloc=on,off` runs every case with and without the
glibc malloc tuning that main.py applies (mpl_tf/malloc_tuning.py).

FLOPs per step are counted from the model (benchmarks/flops.py: conv and
dense multiply-accumulates of one image x 2 = F) and the passes each step
really makes, with backward = 2 x forward (3F per image trained through):
  supervised  3F * B
  uda         3F * (B + 2*B*mu)           one forward+backward on [x_l; x_u; aug]
  mpl_exact   3F * (B + 2*B*mu)           teacher
              + 3F * (B*mu + B)           student on [x_u; x_l]
              + 3F * B                    student's labeled loss at the new
                                          weights and its gradient (exact h)
  mpl_taylor  as mpl_exact, but F * B for the last line (forward only).
  mpl_exact_ori_no_grad  as mpl_exact, but the teacher's 3F * (B + 2*B*mu)
              is 3F * (B + B*mu) + F * B*mu (x_u forward only).
  mpl_exact_rematerialized  as mpl_exact, plus F * (B + 2*B*mu) for the
              teacher's untaped first forward.
  kK, K > 1   the MPL steps rematerialize the teacher chunk by chunk: plus
              F * (B + 2*B*mu) (none if already rematerialized, and
              F * (B + B*mu) under no_grad, whose x_u pass is kept); the
              student's passes, UDA and supervised steps add nothing.
Batch norm, activations and optimizer updates are not counted, so the
achieved rate understates the work slightly and equally for every step.

Writes --output (JSON: every case's numbers, the machine, the command).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {'small': (16, 2), 'big': (64, 7)}
STEPS = ('supervised', 'uda', 'mpl_exact', 'mpl_taylor', 'mpl_exact_ori_no_grad',
         'mpl_exact_rematerialized')
PRECISIONS = ('float32', 'mixed_bfloat16')
# The default grid: every step at both shapes in fp32 without XLA, and the
# precision and XLA comparisons for the supervised and the MPL (exact) step.
# 'supervised:960x1' is the supervised step on as many images per pass as
# the MPL teacher's (B + 2*B*mu at 64x7): it separates what the batch size
# does to the FLOP rate (working set beyond the caches) from what MPL does.
DEFAULT_CASES = tuple(
    [f'{step}:{shape}:float32:noxla' for shape in ('small', 'big')
     for step in STEPS] + ['supervised:960x1:float32:noxla'] +
    [f'{step}:{shape}:mixed_bfloat16:noxla' for shape in ('small', 'big')
     for step in ('supervised', 'mpl_exact')] +
    [f'{step}:{shape}:float32:xla' for shape in ('small', 'big')
     for step in ('supervised', 'mpl_exact')])


def parse_case(text: str) -> dict:
  """'mpl_exact:64x7:float32:noxla[:k4]' ('big' for 64x7) -> a case dict."""
  try:
    step, shape, precision, xla, *chunks = text.split(':')
    batch, mu = SHAPES[shape] if shape in SHAPES else map(int, shape.split('x'))
    microbatches = int(chunks[0][1:]) if chunks else 0
    if len(chunks) > 1 or (chunks and (chunks[0][:1] != 'k' or
                                       microbatches < 1)):
      raise ValueError(chunks)
  except ValueError:
    raise SystemExit(f'--cases: {text!r} is not step:BxMU:precision:xla'
                     f'[:kK], e.g. mpl_exact:64x7:float32:noxla:k4.') from None
  if step not in STEPS or precision not in PRECISIONS or xla not in (
      'xla', 'noxla'):
    raise SystemExit(f'--cases: {text!r}: step in {STEPS}, precision in '
                     f'{PRECISIONS}, xla in (xla, noxla).')
  # microbatches 0: the field is not set (the default networks, K=1).
  return {'name': text, 'step': step, 'batch': batch, 'mu': mu,
          'precision': precision, 'xla': xla == 'xla',
          'microbatches': microbatches}


def images_and_flops(step: str, batch: int, mu: int, forward_flops: float,
                     microbatches: int = 1):
  """(images the step consumes, FLOPs per step) as the module doc counts."""
  unlabeled = batch * mu
  if step == 'supervised':
    return batch, 3 * forward_flops * batch
  teacher = 3 * forward_flops * (batch + 2 * unlabeled)
  if step == 'mpl_exact_ori_no_grad':
    teacher = forward_flops * (3 * (batch + unlabeled) + unlabeled)
    if microbatches > 1:
      teacher += forward_flops * (batch + unlabeled)
  elif step == 'mpl_exact_rematerialized' or (
      microbatches > 1 and step != 'uda'):
    teacher = 4 * forward_flops * (batch + 2 * unlabeled)
  if step == 'uda':
    return batch + 2 * unlabeled, teacher
  student = 3 * forward_flops * (unlabeled + batch)
  relabel = (1 if step == 'mpl_taylor' else 3) * forward_flops * batch
  return batch + 2 * unlabeled, teacher + student + relabel


# ----------------------------------------------------------------- worker --

def _matmul_peak(dtype, size: int = 2048, repeats: int = 12) -> float:
  """GFLOP/s of chained size x size matmuls in one tf.function (best of 3)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  a = tf.random.stateless_normal([size, size], [0, 1], dtype=tf.float32)
  b = tf.random.stateless_normal([size, size], [0, 2], dtype=tf.float32)
  a, b = tf.cast(a, dtype), tf.cast(b / size ** 0.5, dtype)

  @tf.function
  def chain(x):
    for _ in range(repeats):
      x = tf.matmul(x, b)
    return tf.reduce_sum(tf.cast(x[:1, :1], tf.float32))

  chain(a).numpy()
  best = float('inf')
  for _ in range(3):
    start = time.perf_counter()
    chain(a).numpy()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 * repeats / best / 1e9


def _build_loop(case: dict):
  """(loop, iterator, forward FLOPs of one image) for the case's step."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  from flops import forward_macs  # pylint: disable=g-import-not-at-top
  from mpl_tf import config as config_lib  # pylint: disable=g-import-not-at-top
  from mpl_tf import device_loop, optim, train  # pylint: disable=g-import-not-at-top
  from mpl_tf.models import build_model  # pylint: disable=g-import-not-at-top
  from mpl_tf.mpl_step import MplStep  # pylint: disable=g-import-not-at-top
  from mpl_tf.supervised_step import SupervisedStep  # pylint: disable=g-import-not-at-top
  from mpl_tf.uda_step import UdaStep  # pylint: disable=g-import-not-at-top

  batch, unlabeled = case['batch'], case['batch'] * case['mu']
  size = case['image_size']
  microbatches = case['microbatches'] or 1
  model_cfg = config_lib.ModelConfig(
      name=case['model'], precision=case['precision'],
      sync_batch_norm=not case['microbatches'],
      batch_norm_kernel=case.get('batch_norm_kernel', 'fused'))
  optim_cfg = config_lib.OptimConfig(labeled_batch_size=batch,
                                     uda_ratio=case['mu'])
  mpl_cfg = config_lib.MplConfig(
      feedback='taylor' if case['step'] == 'mpl_taylor' else 'exact',
      teacher_original_pass=('no_grad' if case['step'] ==
                             'mpl_exact_ori_no_grad' else 'shared'),
      rematerialize_teacher=case['step'] == 'mpl_exact_rematerialized',
      microbatches=microbatches)
  teacher_lr, student_lr = optim.learning_rates(optim_cfg)
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  with strategy.scope():
    build = lambda name: build_model(model_cfg, 10, size, name)
    if case['step'] == 'supervised':
      model = build('supervised')
      replica_step = SupervisedStep(
          model, optim.make_optimizer(teacher_lr, optim_cfg, 'opt', model),
          optim_cfg, 0.0, batch, microbatches=microbatches)
    elif case['step'] == 'uda':
      model, ema_model = build('uda'), build('uda_ema')
      replica_step = UdaStep(
          mpl_cfg, optim_cfg, model,
          optim.make_optimizer(teacher_lr, optim_cfg, 'opt', model),
          ema_model=ema_model, global_labeled_batch=batch,
          global_unlabeled_batch=unlabeled)
    else:
      model, student, ema_student = (build('teacher'), build('student'),
                                     build('ema_student'))
      replica_step = train.mpl_replica_step(MplStep(
          mpl_cfg, optim_cfg, model, student,
          optim.make_optimizer(teacher_lr, optim_cfg, 't_opt', model),
          optim.make_optimizer(student_lr, optim_cfg, 's_opt', student),
          ema_student=ema_student, global_labeled_batch=batch,
          global_unlabeled_batch=unlabeled))
  rng = np.random.default_rng(0)
  images = lambda n: rng.normal(size=(n, size, size, 3)).astype(np.float32)
  inputs = {'labeled_images': images(batch),
            'labels': rng.integers(0, 10, batch).astype(np.int32)}
  if case['step'] != 'supervised':
    inputs.update(unlabeled_images_ori=images(unlabeled),
                  unlabeled_images_aug=images(unlabeled))
  dataset = tf.data.Dataset.from_tensors(inputs).repeat()
  iterator = iter(strategy.experimental_distribute_dataset(dataset))
  loop = device_loop.make_train_loop(strategy, replica_step, case['xla'])
  return loop, iterator, 2.0 * forward_macs(model)


def run_worker(case: dict, steps: int) -> dict:
  """Measures one case in this (fresh) process."""
  # As main.py does, before TensorFlow allocates (off when the parent set
  # MPL_TF_MALLOC_TUNING=0 for this case).
  from mpl_tf import malloc_tuning  # pylint: disable=g-import-not-at-top
  malloc = malloc_tuning.summary(malloc_tuning.tune())
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  peaks = {'float32': _matmul_peak(tf.float32)}
  if case['precision'] == 'mixed_bfloat16':
    peaks['bfloat16'] = _matmul_peak(tf.bfloat16)
  loop, iterator, forward_flops = _build_loop(case)
  start = time.perf_counter()
  loop(iterator, tf.constant(1))['health/nonfinite'].numpy()
  first_call = time.perf_counter() - start
  rss_after_first_call = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  loop(iterator, tf.constant(1))['health/nonfinite'].numpy()  # Warm-up.
  usage = resource.getrusage(resource.RUSAGE_SELF)
  start = time.perf_counter()
  loop(iterator, tf.constant(steps))['health/nonfinite'].numpy()
  seconds = (time.perf_counter() - start) / steps
  after = resource.getrusage(resource.RUSAGE_SELF)
  images, flops = images_and_flops(case['step'], case['batch'], case['mu'],
                                   forward_flops, case['microbatches'])
  peak = peaks['bfloat16' if case['precision'] == 'mixed_bfloat16'
               else 'float32']
  return dict(
      case, steps=steps, first_call_seconds=first_call,
      seconds_per_step=seconds, images_per_step=images,
      images_per_second=images / seconds, forward_gflops_per_image=(
          forward_flops / 1e9), gflops_per_step=flops / 1e9,
      achieved_gflops=flops / seconds / 1e9,
      matmul_peak_gflops=peaks, fraction_of_peak=flops / seconds / 1e9 / peak,
      user_cpu_per_step=(after.ru_utime - usage.ru_utime) / steps,
      system_cpu_per_step=(after.ru_stime - usage.ru_stime) / steps,
      minor_faults_per_step=(after.ru_minflt - usage.ru_minflt) / steps,
      peak_rss_gb=after.ru_maxrss / 1024 ** 2,
      peak_rss_after_first_call_gb=rss_after_first_call / 1024 ** 2,
      allocator=os.environ.get('LD_PRELOAD', '') or 'glibc',
      malloc_tuning=malloc)


# ----------------------------------------------------------------- parent --

def _pipeline_images_per_second(batch: int, mu: int) -> float:
  """The training stream's rate (input_pipeline.py), in a child process."""
  code = ('import json, sys, tempfile; sys.path.insert(0, "benchmarks");'
          'import input_pipeline as p\n'
          'with tempfile.TemporaryDirectory() as d:\n'
          '  m = p._write_noise_set(d, 2000, 5000)\n'
          f'  s = p.measure_pipeline(p._cifar_config(d, {batch}, {mu}), m, 40)\n'
          f'print(json.dumps({{"rate": ({batch} + 2 * {batch} * {mu}) / s}}))')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])['rate']


def _row(r: dict) -> str:
  return (f'| {r["step"]} | {r["model"]} {r["image_size"]}px | '
          f'{r.get("batch_norm_kernel", "keras")} | '
          f'{r["batch"]}x{r["mu"]} | {r.get("microbatches") or "-"} | '
          f'{r["precision"]} | '
          f'{"off" if r["malloc_tuning"].startswith("all=off") else "on"} | '
          f'{"on" if r["xla"] else "off"} | {r["seconds_per_step"]:.3f} | '
          f'{r["images_per_second"]:.0f} | {r["gflops_per_step"]:.1f} | '
          f'{r["achieved_gflops"]:.1f} | '
          f'{r["matmul_peak_gflops"]["float32"]:.0f}'
          + (f' / {r["matmul_peak_gflops"]["bfloat16"]:.0f}'
             if 'bfloat16' in r['matmul_peak_gflops'] else '') +
          f' | {r["fraction_of_peak"]:.0%} | {r["first_call_seconds"]:.1f} | '
          f'{r["user_cpu_per_step"]:.2f} | {r["system_cpu_per_step"]:.2f} | '
          f'{r["minor_faults_per_step"]:,.0f} | {r["peak_rss_gb"]:.2f} |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', default='',
                      help='Comma-separated step:BxMU:precision:xla; '
                           'default: the grid in DEFAULT_CASES.')
  parser.add_argument('--shapes', default='small,big',
                      help='Only default cases of these shapes.')
  parser.add_argument('--steps', type=int, default=0,
                      help='Timed steps per case (default: 3 for the '
                           'unlabeled steps at 64x7, 10 otherwise).')
  parser.add_argument('--malloc', default='on',
                      help='on | off | on,off: run each case with the '
                           'product\'s glibc malloc tuning '
                           '(mpl_tf/malloc_tuning.py), without it '
                           '(MPL_TF_MALLOC_TUNING=0), or both.')
  parser.add_argument('--microbatches', default='',
                      help='Comma-separated K: every case once per K '
                           '(MplConfig.microbatches), each in its own '
                           'process, so peak RSS is per K.')
  parser.add_argument('--skip_pipeline', action='store_true')
  parser.add_argument('--output', default=os.path.join(
      REPO, 'benchmarks', 'step_benchmark.json'))
  parser.add_argument('--model', default='wrn-28-2',
                      help='The network of every case (the README demo: '
                           'wrn-10-2).')
  parser.add_argument('--image_size', type=int, default=32,
                      help='Image side of every case (the demo: 16).')
  parser.add_argument('--batch_norm_kernel', default='fused',
                      choices=('fused', 'keras'),
                      help='ModelConfig.batch_norm_kernel of every case.')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    case = dict(parse_case(args.worker), model=args.model,
                image_size=args.image_size,
                batch_norm_kernel=args.batch_norm_kernel)
    print(json.dumps(run_worker(case, args.steps)))
    return

  names = args.cases.split(',') if args.cases else [
      c for c in DEFAULT_CASES
      if c.split(':')[1] in args.shapes.split(',') or (
          'big' in args.shapes and c.split(':')[1] == '960x1')]
  if args.microbatches:
    names = [f'{name}:k{k}' for name in names
             for k in args.microbatches.split(',')]
  cases = [parse_case(name) for name in names]
  header = ('| step | network | batch norm | BxMU | microbatches | '
            'precision | '
            'malloc tuning | XLA | s/step | '
            'img/s | GFLOP/step | GFLOP/s | matmul peak GFLOP/s | of peak | '
            'first call s | user s/step | sys s/step | minor faults/step | '
            'peak RSS GB |')
  print(header)
  print('|' + '---|' * (header.count('|') - 1))
  results = []
  settings = args.malloc.split(',')
  if not settings or set(settings) - {'on', 'off'}:
    raise SystemExit(f'--malloc={args.malloc!r}: on, off or on,off.')
  for case, malloc in [(c, m) for c in cases for m in settings]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=REPO,
               MPL_TF_MALLOC_TUNING='1' if malloc == 'on' else '0')
    steps = args.steps or (3 if case['step'] != 'supervised' and
                           case['batch'] * case['mu'] >= 448 else 10)
    process = subprocess.run(
        [sys.executable, os.path.abspath(__file__), '--worker', case['name'],
         '--steps', str(steps), '--model', args.model, '--image_size',
         str(args.image_size), '--batch_norm_kernel', args.batch_norm_kernel],
        cwd=REPO, env=env, capture_output=True,
        text=True)
    if process.returncode:
      sys.stderr.write(process.stderr[-3000:])
      raise SystemExit(f'case {case["name"]} failed (exit '
                       f'{process.returncode}); its stderr is above.')
    results.append(json.loads(process.stdout.strip().splitlines()[-1]))
    print(_row(results[-1]), flush=True)

  pipeline = {}
  if not args.skip_pipeline:
    for batch, mu in sorted({(c['batch'], c['mu']) for c in cases
                             if c['step'] != 'supervised'}):
      rate = _pipeline_images_per_second(batch, mu)
      steps = [r for r in results if (r['batch'], r['mu']) == (batch, mu)
               and r['step'] != 'supervised']
      slowest = min((r['images_per_second'] for r in steps), default=None)
      pipeline[f'{batch}x{mu}'] = {'images_per_second': rate,
                                   'slowest_step_images_per_second': slowest}
      print(f'input pipeline {batch}x{mu}: {rate:,.0f} images/s'
            + (f' = {rate / slowest:,.0f}x the slowest step\'s consumption'
               if slowest else ''))
  with open(args.output, 'w') as f:
    json.dump({'command': ' '.join(['benchmarks/step_benchmark.py',
                                    *sys.argv[1:]]),
               'cpu_count': os.cpu_count(), 'cases': results,
               'pipeline': pipeline}, f, indent=2, sort_keys=True)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
