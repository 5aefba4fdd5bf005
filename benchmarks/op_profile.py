"""Where the MPL step's time goes, by op kind (TensorFlow's profiler).

  .venv/bin/python benchmarks/op_profile.py                       # 8x7 fp32
  .venv/bin/python benchmarks/op_profile.py --batch_norm_kernel=keras
  .venv/bin/python benchmarks/op_profile.py --case=mpl_exact:64x7:float32:noxla

Builds exactly what benchmarks/step_benchmark.py measures (its `_build_loop`:
the library's step in the product's device loop on WRN-28-2, one constant
batch, the malloc tuning main.py applies), runs one call to trace and one to
warm up, then --steps steps under `tf.profiler.experimental`, and reads the
profile (the XSpace protobuf the profiler writes) directly.

Every TensorFlow op kernel the runtime executes is one event `name:type` on
the thread that ran it. An op's *self* time is its event's duration minus
the op events nested inside it on the same thread (a function-call op that
runs its body inline), so nothing is counted twice. The kinds:

  conv forward / conv backprop   Conv2D, fused conv, MatMul (the classifier);
                                 backprop = Conv2DBackpropInput/Filter and
                                 any MatMul under `gradient_tape/`
  batch norm forward / backward  FusedBatchNorm* ops, and every op inside a
                                 batch-norm layer's name scope (`*_bn<k>`:
                                 Keras's separate moments, normalisation and
                                 moving-average updates; ops Grappler renamed
                                 out of the scope count as elementwise);
                                 backward = under
                                 `gradient_tape/` or a *Grad op
  elementwise                    activations, their gradients, adds,
                                 multiplies, casts, softmax, reductions, ...
  copies/concat/transpose        Concat, Split, Slice, Transpose, Pad, Tile,
                                 Identity, layout conversions, ...
  optimizer/variables            ResourceApply*, Assign*, ReadVariableOp
  other                          everything else (the top op types of every
                                 kind are printed and in the JSON)

Self times are summed over threads, so on 2 cores their total can be up to
2x the wall time; the fractions are what compares across runs on a shared
machine. oneDNN's kernel names (`_MklNativeConv2D`, ...) are reported as
they are and classified by the TensorFlow op they implement.

Writes --output (JSON: the case, wall seconds per step, self seconds per
step by kind and by op type, the machine).
"""

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
sys.path.insert(0, REPO)

KINDS = ('conv forward', 'conv backprop', 'batch norm forward',
         'batch norm backward', 'elementwise', 'copies/concat/transpose',
         'optimizer/variables', 'other')
# An op event's name: `op_name:OpType` (no spaces; '::' marks the runtime's
# own TraceMe events, which are not ops).
_OP_EVENT = re.compile(r'^([^\s:]+):([A-Za-z_][A-Za-z0-9_]*)$')
# A batch-norm layer's scope: `stage1_block1_bn2`, `head_bn`, with Keras's
# uniquifying suffix (`stage1_block1_bn2_1`).
_BATCH_NORM_SCOPE = re.compile(r'(^|/)[A-Za-z0-9_]*_bn\d*(_\d+)?(/|$)|'
                               r'batch_normalization')
_CONV = {'Conv2D', 'FusedConv2D', 'DepthwiseConv2dNative', 'MatMul',
         'FusedMatMul', 'BatchMatMulV2', 'Conv2DWithBias'}
_CONV_BACKPROP = {'Conv2DBackpropInput', 'Conv2DBackpropFilter',
                  'Conv2DBackpropFilterWithBias',
                  'DepthwiseConv2dNativeBackpropInput',
                  'DepthwiseConv2dNativeBackpropFilter'}
_COPIES = {'ConcatV2', 'Concat', 'Split', 'SplitV', 'Slice', 'StridedSlice',
           'StridedSliceGrad', 'Transpose', 'Pad', 'PadV2', 'MirrorPad',
           'Tile', 'Identity', 'IdentityN', 'Copy', 'Reshape', 'Pack',
           'Unpack', 'GatherV2', 'ToTf', 'InputConversion', 'ExpandDims',
           'Squeeze', 'BroadcastTo', 'ZerosLike', 'OnesLike', 'Fill'}
_VARIABLES = re.compile(r'^(ResourceApply|Assign|ReadVariableOp|VarHandleOp|'
                        r'ResourceScatter|ResourceGather|VariableShape)')
_ELEMENTWISE = re.compile(
    r'^(Relu|Relu6|LeakyRelu|Elu|Selu|Sigmoid|Tanh|Softplus|Swish|Add|AddV2|'
    r'AddN|Sub|Mul|MulNoNan|RealDiv|DivNoNan|Div|Maximum|Minimum|Square|'
    r'SquaredDifference|Sqrt|Rsqrt|Neg|Exp|Log|Log1p|Abs|Sign|Reciprocal|'
    r'Cast|Select|SelectV2|Softmax|LogSoftmax|'
    r'SoftmaxCrossEntropyWithLogits|SparseSoftmaxCrossEntropyWithLogits|'
    r'Sum|Mean|Max|Min|Prod|ArgMax|L2Loss|BiasAdd|BiasAddGrad|Equal|'
    r'NotEqual|Greater|GreaterEqual|Less|LessEqual|LogicalAnd|LogicalOr|'
    r'LogicalNot|IsFinite|Pow|FloorDiv|FloorMod|ClipByValue|Erf|'
    r'StopGradient|PreventGradient)(Grad)?$')


def base_type(op_type: str) -> str:
  """The TensorFlow op a oneDNN kernel implements (_MklNativeConv2D -> Conv2D)."""
  return re.sub(r'^_(MklNative|Mkl)?', '', op_type)


def kind_of(op_name: str, op_type: str) -> str:
  """One of KINDS for an executed op (module doc)."""
  kind = base_type(op_type)
  backward = op_name.startswith('gradient_tape/') or '/gradient_tape/' in (
      op_name) or kind.endswith('Grad') or 'GradV' in kind
  if kind.startswith('FusedBatchNorm') or _BATCH_NORM_SCOPE.search(op_name):
    return 'batch norm backward' if backward else 'batch norm forward'
  if kind in _CONV_BACKPROP or (backward and kind in _CONV):
    return 'conv backprop'
  if kind in _CONV:
    return 'conv forward'
  if kind in _COPIES:
    return 'copies/concat/transpose'
  if _VARIABLES.match(kind):
    return 'optimizer/variables'
  if _ELEMENTWISE.match(kind):
    return 'elementwise'
  return 'other'


def op_self_times(space) -> dict:
  """{(op name, op type): self microseconds summed over events} of an XSpace."""
  totals = collections.Counter()
  for plane in space.planes:
    metadata = plane.event_metadata
    for line in plane.lines:
      events = []
      for event in line.events:
        match = _OP_EVENT.match(metadata[event.metadata_id].name)
        if match:
          events.append((event.offset_ps, event.offset_ps + event.duration_ps,
                         match.groups()))
      events.sort(key=lambda e: (e[0], -e[1]))
      stack = []  # [end, key, duration, nested]
      for start, end, key in events:
        while stack and stack[-1][0] <= start:
          _close(stack.pop(), totals)
        if stack:
          stack[-1][3] += end - start
        stack.append([end, key, end - start, 0])
      while stack:
        _close(stack.pop(), totals)
  return totals


def _close(frame, totals) -> None:
  _, key, duration, nested = frame
  totals[key] += max(duration - nested, 0) / 1e6  # ps -> us


def summarize(totals: dict, steps: int) -> dict:
  """Seconds per step by kind and by (kind, op type)."""
  by_kind = collections.Counter({kind: 0.0 for kind in KINDS})
  by_type = collections.Counter()
  for (name, op_type), micros in totals.items():
    kind = kind_of(name, op_type)
    by_kind[kind] += micros / 1e6 / steps
    by_type[(kind, op_type)] += micros / 1e6 / steps
  return {'by_kind': dict(by_kind),
          'by_type': [{'kind': k, 'op_type': t, 'seconds_per_step': s}
                      for (k, t), s in by_type.most_common()]}


def profile(case: dict, steps: int) -> dict:
  from mpl_tf import malloc_tuning  # pylint: disable=g-import-not-at-top
  malloc = malloc_tuning.summary(malloc_tuning.tune())
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  import step_benchmark  # pylint: disable=g-import-not-at-top
  peak = step_benchmark._matmul_peak(tf.float32)  # pylint: disable=protected-access
  loop, iterator, _ = step_benchmark._build_loop(case)  # pylint: disable=protected-access
  for _ in range(2):  # Trace, then warm up.
    loop(iterator, tf.constant(1))['health/nonfinite'].numpy()
  start = time.perf_counter()
  loop(iterator, tf.constant(steps))['health/nonfinite'].numpy()
  unprofiled = (time.perf_counter() - start) / steps
  with tempfile.TemporaryDirectory() as logdir:
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    loop(iterator, tf.constant(steps))['health/nonfinite'].numpy()
    profiled = (time.perf_counter() - start) / steps
    tf.profiler.experimental.stop()
    (path,) = glob.glob(os.path.join(logdir, '**', '*.xplane.pb'),
                        recursive=True)
    space = xplane_pb2.XSpace()
    with open(path, 'rb') as f:
      space.ParseFromString(f.read())
  return dict(case=case, steps=steps, seconds_per_step=unprofiled,
              profiled_seconds_per_step=profiled, matmul_peak_gflops=peak,
              malloc_tuning=malloc, cpu_count=os.cpu_count(),
              onednn=os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default'),
              **summarize(op_self_times(space), steps))


def report(result: dict, top: int = 25) -> str:
  total = sum(result['by_kind'].values())
  lines = [f'{result["case"]["name"]} batch norm '
           f'{result["case"]["batch_norm_kernel"]}: '
           f'{result["seconds_per_step"]:.3f} s/step '
           f'({result["profiled_seconds_per_step"]:.3f} profiled), op self '
           f'time {total:.3f} s/step summed over threads; fp32 matmul peak '
           f'{result["matmul_peak_gflops"]:.0f} GFLOP/s', '',
           '| kind | s/step | share |', '|---|---|---|']
  for kind in KINDS:
    seconds = result['by_kind'][kind]
    lines.append(f'| {kind} | {seconds:.3f} | {seconds / total:.1%} |')
  lines += ['', f'top {top} op types:', '| kind | op type | s/step | share |',
            '|---|---|---|---|']
  for row in result['by_type'][:top]:
    lines.append(f'| {row["kind"]} | {row["op_type"]} | '
                 f'{row["seconds_per_step"]:.3f} | '
                 f'{row["seconds_per_step"] / total:.1%} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--case', default='mpl_exact:8x7:float32:noxla',
                      help='step:BxMU:precision:xla[:kK] as in '
                           'step_benchmark.py.')
  parser.add_argument('--batch_norm_kernel', default='fused',
                      choices=('fused', 'keras'))
  parser.add_argument('--steps', type=int, default=2,
                      help='Profiled steps (and as many timed without the '
                           'profiler), after one trace and one warm-up call.')
  parser.add_argument('--model', default='wrn-28-2')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--output', default='')
  args = parser.parse_args()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import step_benchmark  # pylint: disable=g-import-not-at-top
  case = dict(step_benchmark.parse_case(args.case), model=args.model,
              image_size=args.image_size,
              batch_norm_kernel=args.batch_norm_kernel)
  result = profile(case, args.steps)
  print(report(result))
  output = args.output or os.path.join(
      REPO, 'benchmarks',
      f'op_profile_{case["batch"]}x{case["mu"]}_{args.batch_norm_kernel}.json')
  with open(output, 'w') as f:
    json.dump(dict(result, command=' '.join(
        ['benchmarks/op_profile.py', *sys.argv[1:]])), f, indent=2,
              sort_keys=True)
  print(f'wrote {output}')


if __name__ == '__main__':
  main()
