"""glibc malloc tuning: large buffers are reused instead of faulted in again.

Measured in fresh processes (the setting is process-wide and must come
before anything allocates): a 64 MiB buffer is allocated, written and freed
six times; the page faults of the last five rounds are counted with
getrusage. glibc's default serves it with mmap and unmaps it on free, so
every round faults in all 16,384 pages again; tuned, the heap keeps it.
"""

import json
import os
import subprocess
import sys
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROUNDS = 5
_PAGES = (64 << 20) // os.sysconf('SC_PAGE_SIZE')
_PROBE = f'''
import ctypes, json, resource, sys
sys.path.insert(0, {REPO!r})
from mpl_tf import malloc_tuning
done = malloc_tuning.tune()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def one_round():
  buffer = libc.malloc(64 << 20)
  ctypes.memset(buffer, 1, 64 << 20)
  libc.free(buffer)
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({_ROUNDS}):
  one_round()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({{'done': done, 'faults': faults}}))
'''


def _probe(**environment):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith('MALLOC_') and k != 'GLIBC_TUNABLES'}
  env.pop('MPL_TF_MALLOC_TUNING', None)
  env.update(environment)
  output = subprocess.run([sys.executable, '-c', _PROBE], env=env, check=True,
                          capture_output=True, text=True, timeout=60).stdout
  return json.loads(output.strip().splitlines()[-1])


class MallocTuningTest(unittest.TestCase):

  def test_tuned_process_reuses_a_large_buffer(self):
    tuned = _probe()
    self.assertEqual(tuned['done'], {'mmap_max': '0',
                                     'trim_threshold': str(1 << 40),
                                     'top_pad': str(64 << 20),
                                     'arena_max': '1'})
    self.assertLess(tuned['faults'], _PAGES // 10)

  def test_turned_off_faults_every_round_like_glibc(self):
    off = _probe(MPL_TF_MALLOC_TUNING='0')
    self.assertIn('off', off['done']['all'])
    self.assertGreater(off['faults'], _ROUNDS * _PAGES * 0.9)

  def test_the_users_own_glibc_settings_are_kept(self):
    kept = _probe(MALLOC_ARENA_MAX='4')
    self.assertEqual(kept['done']['arena_max'], 'set by the environment')
    self.assertEqual(kept['done']['mmap_max'], '0')


if __name__ == '__main__':
  unittest.main()
