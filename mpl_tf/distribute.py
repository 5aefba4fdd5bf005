"""The distribution strategy of a run, from its config, in one place.

* 'tpu': TPUStrategy through a TPUClusterResolver (`--tpu` names the TPU, or
  'local' on a TPU VM); the TPU system is initialised here.
* 'mirrored': MirroredStrategy over every local GPU (or, on a CPU-only
  machine, every logical CPU device; tests split the CPU into two).
* 'multi_worker': MultiWorkerMirroredStrategy, configured by TF_CONFIG.
* 'one_device': OneDeviceStrategy on the first GPU, else the CPU.

The training step is written for any of them: it sums gradients across
replicas itself and divides every loss by the global batch.
"""

import tensorflow as tf

from mpl_tf.config import ConfigError, RunConfig


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
    return tf.distribute.MultiWorkerMirroredStrategy()
  if name == 'one_device':
    return tf.distribute.OneDeviceStrategy(_local_devices()[0].name)
  raise ConfigError(f'strategy={name!r} is not tpu, mirrored, multi_worker '
                    f'or one_device.')


def check_batch_divides(strategy: tf.distribute.Strategy, name: str,
                        batch_size: int) -> None:
  """A global batch must split evenly between the replicas."""
  replicas = strategy.num_replicas_in_sync
  if batch_size % replicas:
    raise ConfigError(
        f'{name}={batch_size} does not divide evenly between the '
        f'{replicas} replicas of this strategy; use a multiple of {replicas}.')
