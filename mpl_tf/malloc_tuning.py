"""glibc malloc settings that keep TensorFlow's large buffers in the process.

Why: TensorFlow's CPU allocator takes every tensor from malloc. glibc serves
a request above its mmap threshold (at most 32 MiB, usually far less) with a
fresh mmap and hands it back with munmap on free; each thread also gets an
arena of its own, whose heaps are mmapped and trimmed the same way. A
training step allocates and frees the same activation-sized buffers every
step, so the kernel zero-fills and faults them in again every step. On one
2-core machine of ours that was 442 s of system CPU against 653 s of user
CPU over 150 demo steps (137 million minor page faults); on another it did
not show. The product's speed must not depend on the machine's page-fault
cost, so every entry point (main.py, the benchmarks, the experiments) calls
`tune()` before TensorFlow starts its threads or allocates:

  M_MMAP_MAX = 0        no mmapped chunks: large buffers come from the heap
                        and are reused after free.
  M_TRIM_THRESHOLD      1 TiB: freed memory at the top of the heap is not
                        returned to the kernel (the next step wants it back).
  M_TOP_PAD = 64 MiB    each heap extension asks for 64 MiB more than needed,
                        so a growing heap makes few brk calls.
  M_ARENA_MAX = 1       one arena for all threads: per-thread arenas are
                        mmapped heaps that are trimmed (and faulted in again)
                        on their own, and on the 64x7 MPL step they cost as
                        much system CPU as the mmap threshold
                        (docs/performance.md).

The price is a higher resident size (memory freed after a peak stays in the
process: docs/performance.md has the figures). A setting the user gave
through glibc's own environment variables (MALLOC_ARENA_MAX etc. or
GLIBC_TUNABLES) is left as the user set it; with another allocator preloaded
(LD_PRELOAD of tcmalloc or jemalloc) nothing is changed; and
MPL_TF_MALLOC_TUNING=0 turns all of it off. Outside glibc (macOS, musl) this
does nothing.

This module imports nothing but the standard library, so it can run before
`import tensorflow`.
"""

import ctypes
import ctypes.util
import os
from typing import Dict

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# parameter: (mallopt number, value, glibc's environment variable for it,
#             its GLIBC_TUNABLES name)
SETTINGS = {
    'mmap_max': (_M_MMAP_MAX, 0, 'MALLOC_MMAP_MAX_', 'glibc.malloc.mmap_max'),
    'trim_threshold': (_M_TRIM_THRESHOLD, 1 << 40, 'MALLOC_TRIM_THRESHOLD_',
                       'glibc.malloc.trim_threshold'),
    'top_pad': (_M_TOP_PAD, 64 << 20, 'MALLOC_TOP_PAD_',
                'glibc.malloc.top_pad'),
    'arena_max': (_M_ARENA_MAX, 1, 'MALLOC_ARENA_MAX',
                  'glibc.malloc.arena_max'),
}
DISABLE_VARIABLE = 'MPL_TF_MALLOC_TUNING'


def _glibc():
  """The process's C library if it is glibc (it has gnu_get_libc_version)."""
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc
  except (AttributeError, OSError):
    return None


def tune(environ=None) -> Dict[str, str]:
  """Sets the mallopt parameters above; returns {parameter: what happened}.

  Safe to call more than once. Must run before TensorFlow starts its thread
  pools for M_ARENA_MAX to cover them (arenas are made per thread on first
  contention, and never removed).
  """
  environ = os.environ if environ is None else environ
  if environ.get(DISABLE_VARIABLE, '1').strip().lower() in ('0', 'false',
                                                            'off', 'no'):
    return {'all': f'off ({DISABLE_VARIABLE}={environ[DISABLE_VARIABLE]})'}
  preload = environ.get('LD_PRELOAD', '')
  if 'malloc' in preload or 'jemalloc' in preload:
    return {'all': f'left alone (LD_PRELOAD={preload})'}
  libc = _glibc()
  if libc is None:
    return {'all': 'left alone (not glibc)'}
  tunables = environ.get('GLIBC_TUNABLES', '')
  done = {}
  for name, (number, value, variable, tunable) in SETTINGS.items():
    if variable in environ or tunable in tunables:
      done[name] = 'set by the environment'
    elif libc.mallopt(number, value) == 1:
      done[name] = str(value)
    else:
      done[name] = 'refused by mallopt'
  return done


def summary(done: Dict[str, str]) -> str:
  """One line for logs: 'mmap_max=0 trim_threshold=... ...'."""
  return ' '.join(f'{name}={what}' for name, what in done.items())
