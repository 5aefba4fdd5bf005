"""The distribution strategy of a run, from its config, in one place.

* 'tpu': TPUStrategy through a TPUClusterResolver (`--tpu` names the TPU, or
  'local' on a TPU VM); the TPU system is initialised here.
* 'mirrored': MirroredStrategy over every local GPU (or, on a CPU-only
  machine, every logical CPU device; tests split the CPU into two).
* 'multi_worker': MultiWorkerMirroredStrategy, configured by TF_CONFIG,
  which it needs (without it TensorFlow would train one lone replica, and
  two such processes on one model_dir would both write as the chief). The
  workers first meet in rendezvous.py, within --cluster_start_timeout.
* 'one_device': OneDeviceStrategy on the first GPU, else the CPU.

The training step is written for any of them: it sums gradients across
replicas itself and divides every loss by the global batch.
"""

import json
import os
import re
from typing import Any, Dict, Optional

import tensorflow as tf

from mpl_tf import rendezvous
from mpl_tf.config import Config, ConfigError, RunConfig

_TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host0:port", "host1:port"]}, '
                      '"task": {"type": "worker", "index": 0}}')
_ADDRESS = re.compile(r'^[^:\s]+:\d+$|^\[[0-9a-fA-F:.]+\]:\d+$')


def _local_devices():
  gpus = tf.config.list_logical_devices('GPU')
  return gpus or tf.config.list_logical_devices('CPU')


# One strategy object per kind and process. Collective ops key their
# instances per strategy object, so two MirroredStrategy objects used in one
# process (two runs in one test session, say) can abort each other's
# all-reduces with "Shape mismatch in the collective instance".
_STRATEGIES = {}


def get_strategy(run_config: RunConfig) -> tf.distribute.Strategy:
  """The strategy named by `run_config.strategy`, built once per process."""
  key = (run_config.strategy, run_config.tpu)
  if key not in _STRATEGIES:
    _STRATEGIES[key] = _build_strategy(run_config)
  return _STRATEGIES[key]


def _build_strategy(run_config: RunConfig) -> tf.distribute.Strategy:
  name = run_config.strategy
  if name == 'tpu':
    try:
      resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
          tpu=run_config.tpu or 'local')
      tf.config.experimental_connect_to_cluster(resolver)
      tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError) as error:
      raise ConfigError(
          f'strategy=tpu but no TPU could be reached with tpu='
          f'{run_config.tpu!r} ({error}). On a Cloud TPU VM pass --tpu=local; '
          f'otherwise the TPU name, and check that it is up.') from None
    return tf.distribute.TPUStrategy(resolver)
  if name == 'mirrored':
    return tf.distribute.MirroredStrategy(
        devices=[device.name for device in _local_devices()])
  if name == 'multi_worker':
    tf_config = check_tf_config(os.environ.get('TF_CONFIG'))
    seconds_left = rendezvous.wait_for_peers(tf_config,
                                             run_config.cluster_start_timeout)
    with rendezvous.deadline(seconds_left, tf_config):
      return tf.distribute.MultiWorkerMirroredStrategy()
  if name == 'one_device':
    return tf.distribute.OneDeviceStrategy(_local_devices()[0].name)
  raise ConfigError(f'strategy={name!r} is not tpu, mirrored, multi_worker '
                    f'or one_device.')


def check_tf_config(value: Optional[str]) -> Dict[str, Any]:
  """TF_CONFIG parsed; ConfigError naming its fault, if it is malformed.

  TensorFlow's resolver parses TF_CONFIG with json.loads and indexes it, so
  a typo surfaces as "Expecting ',' delimiter" or a KeyError that never
  says which variable is wrong. Checked here: valid JSON, a "cluster" of
  jobs listing "host:port" addresses, and a "task" whose type is one of
  those jobs and whose index is in its range. An unset or empty TF_CONFIG
  is refused: --strategy=multi_worker means a cluster.
  """
  if not value:
    raise ConfigError(
        f'--strategy=multi_worker needs TF_CONFIG, which is unset: every '
        f'worker needs the same "cluster" and its own "task", e.g. '
        f'TF_CONFIG=\'{_TF_CONFIG_EXAMPLE}\' (docs/training.md, '
        f'multi-worker). On one machine, pass --strategy=mirrored (all its '
        f'GPUs) or --strategy=one_device.')
  def fault(what: str) -> ConfigError:
    return ConfigError(
        f'TF_CONFIG {what}. Every worker needs the same "cluster" and its '
        f'own "task", e.g. TF_CONFIG=\'{_TF_CONFIG_EXAMPLE}\' '
        f'(docs/training.md, multi-worker).')
  try:
    parsed = json.loads(value)
  except ValueError as error:
    raise fault(f'is not valid JSON ({error}; it reads {value[:80]!r})'
                ) from None
  if not isinstance(parsed, dict):
    raise fault(f'is a JSON {type(parsed).__name__}, not an object')
  cluster_spec, task = parsed.get('cluster'), parsed.get('task')
  if not isinstance(cluster_spec, dict) or not cluster_spec:
    raise fault('has no "cluster" object naming the jobs and their workers')
  for job, addresses in cluster_spec.items():
    if (not isinstance(addresses, list) or not addresses or not all(
        isinstance(a, str) and _ADDRESS.match(a) for a in addresses)):
      raise fault(f'lists {addresses!r} for job {job!r}; it must be a list of '
                  f'"host:port" addresses')
  if not isinstance(task, dict) or 'type' not in task or 'index' not in task:
    raise fault('has no "task" with this worker\'s "type" and "index"')
  kind, index = task['type'], task['index']
  if kind not in cluster_spec:
    raise fault(f'has task type {kind!r}, which is not a job of its cluster '
                f'({", ".join(map(repr, cluster_spec))})')
  if (not isinstance(index, int) or isinstance(index, bool) or
      not 0 <= index < len(cluster_spec[kind])):
    raise fault(f'has task index {index!r}; job {kind!r} has '
                f'{len(cluster_spec[kind])} worker(s), numbered from 0')
  return parsed


def check_batch_divides(strategy: tf.distribute.Strategy, name: str,
                        batch_size: int) -> None:
  """A global batch must split evenly between the replicas."""
  replicas = strategy.num_replicas_in_sync
  if batch_size % replicas:
    raise ConfigError(
        f'{name}={batch_size} does not divide evenly between the '
        f'{replicas} replicas of this strategy; use a multiple of {replicas}.')


def check_microbatches(config: Config, replicas: int = 1) -> None:
  """ConfigError unless mpl.microbatches divides every replica's batches.

  Each replica splits its share of the labeled batch (so of the unlabeled
  one, mu times it) and of the finetuning batch into that many equal
  chunks. Checked when the flags are read, on the global batches (one
  replica: flags/definitions.to_config), and again with the strategy's
  replicas before the run writes anything (preflight.check_batches).
  """
  count = config.mpl.microbatches
  batches = [('labeled_batch_size', config.optim.labeled_batch_size)]
  if config.finetune.steps:
    batches.append(('finetune_batch_size', config.finetune.batch_size or
                    config.optim.labeled_batch_size))
  for name, batch in batches:
    share = batch // replicas
    # (A batch the replicas cannot share is refused by check_batch_divides.)
    if batch % replicas or share % count == 0:
      continue
    where = (f'its per-replica share {share} ({batch} over {replicas} '
             f'replicas)' if replicas > 1 else f'the batch {share}')
    unlabeled = (f' (and the unlabeled {share * config.optim.uda_ratio} per '
                 f'view)' if name == 'labeled_batch_size' else '')
    divisors = [k for k in range(1, share + 1) if share % k == 0]
    raise ConfigError(
        f'microbatches={count} does not divide {name}={batch}: {where}'
        f'{unlabeled} must split into {count} equal chunks. Pass '
        f'--microbatches in {divisors}, or a {name} whose per-replica share '
        f'is a multiple of {count}.')
