"""The experiments' value checks: a bad count is refused before training.

A count of zero or less does not fail on its own in these experiments: with
no tuning seeds every validation score is NaN and the first setting "wins";
no step counts or no seeds run nothing and write an empty table; a negative
seed fails only when its data are drawn, after hours of tuning. So every
experiment config's `check` (TwoMoonConfig, ProtocolConfig,
two_moon_tuning.check, AblationConfig) refuses such values up front, each
with one ConfigError that names the flag (the configs' fields are named like
experiment.py's flags) and the value to pass instead. These helpers keep
those messages alike.
"""

import math
from typing import Any, Callable, Sequence

from mpl_tf.config import ConfigError

# make_moons (numpy's RandomState) takes seeds below 2**32.
SEED_LIMIT = 2**32
SEEDS = 'seeds of make_moons and the initial weights'


def show(value: Any) -> str:
  """A value as it is written on the command line (lists comma-separated)."""
  if isinstance(value, (tuple, list)):
    return ','.join(show(v) for v in value)
  return f'{value:g}' if isinstance(value, float) else str(value)


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def at_least(name: str, value, minimum, what: str) -> None:
  """`value` is a finite number >= minimum (NaN is refused too)."""
  if not (_finite(value) and value >= minimum):
    raise ConfigError(f'--{name}={show(value)}: must be at least {minimum} '
                      f'({what}).')


def positive(name: str, value, what: str) -> None:
  if not (_finite(value) and value > 0):
    raise ConfigError(f'--{name}={show(value)}: must be > 0 ({what}).')


def below_one(name: str, value, what: str) -> None:
  """`value` is in [0, 1): a momentum, a threshold."""
  if not (_finite(value) and 0 <= value < 1):
    raise ConfigError(f'--{name}={show(value)}: must be in [0, 1) ({what}).')


def values(name: str, given: Sequence, ok: Callable[[Any], bool],
           requirement: str, example: Sequence) -> None:
  """A list flag: not empty, every value ok, none twice."""
  if not given:
    raise ConfigError(f'--{name} is empty: pass at least one value, e.g. '
                      f'--{name}={show(example)}.')
  bad = [v for v in given if not ok(v)]
  if bad:
    raise ConfigError(f'--{name}={show(given)}: every value {requirement} '
                      f'(not {show(bad[0])}).')
  repeated = [v for i, v in enumerate(given) if v in given[:i]]
  if repeated:
    raise ConfigError(f'--{name}={show(given)}: {show(repeated[0])} is '
                      f'repeated; pass each value once.')


def numbers(name: str, given: Sequence, minimum, example: Sequence,
            strictly: bool = False) -> None:
  """A list flag of finite numbers >= minimum (> minimum if strictly)."""
  if strictly:
    ok = lambda v: _finite(v) and v > minimum
    requirement = f'must be > {minimum}'
  else:
    ok = lambda v: _finite(v) and v >= minimum
    requirement = f'must be at least {minimum}'
  values(name, given, ok, requirement, example)


def seeds(first_name: str, first: int, count: int, offset: int) -> None:
  """Seeds first .. first+count-1 whose draws add up to `offset` to them."""
  at_least(first_name, first, 0, SEEDS)
  last, limit = first + count - 1, SEED_LIMIT - offset
  if last >= limit:
    raise ConfigError(
        f'--{first_name}={first}: its last seed, {last}, must be below '
        f"{limit} (make_moons takes seeds below 2**32, and a seed's draws "
        f'add up to {offset}).')
