"""The project's two entry points, needing only Python 3.11 and pip.

  python3 tasks.py demo    # set up .venv if needed, run the offline demo
  python3 tasks.py test    # set up .venv if needed, run the test suite

The virtual environment is (re)built from requirements.txt whenever that file
changed since the last install, so both commands work on a fresh clone.
Extra arguments are passed on (to main.py or to pytest).
"""

import hashlib
import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, '.venv')
PYTHON = os.path.join(VENV, 'bin', 'python')
REQUIREMENTS = os.path.join(ROOT, 'requirements.txt')
STAMP = os.path.join(VENV, '.requirements.sha256')


def _requirements_hash() -> str:
  with open(REQUIREMENTS, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def ensure_venv() -> None:
  wanted = _requirements_hash()
  if os.path.exists(STAMP) and open(STAMP).read().strip() == wanted:
    return
  if not os.path.exists(PYTHON):
    print(f'creating {VENV}', flush=True)
    venv.EnvBuilder(with_pip=True).create(VENV)
  print('installing requirements.txt (first run: a few minutes)', flush=True)
  subprocess.run([PYTHON, '-m', 'pip', 'install', '--quiet', '--upgrade',
                  'pip'], check=True)
  subprocess.run([PYTHON, '-m', 'pip', 'install', '--quiet', '-r',
                  REQUIREMENTS], check=True)
  with open(STAMP, 'w') as f:
    f.write(wanted)


def _test_workers() -> int:
  return max(1, min(4, len(os.sched_getaffinity(0))))


def main(argv) -> int:
  commands = {
      'demo': [PYTHON, os.path.join(ROOT, 'main.py'),
               '--flagfile=' + os.path.join(ROOT, 'flags', 'demo.cfg')],
      # One test process per core (at most 4): much of the suite is
      # single-threaded tracing and process start-up, so on a 2-core machine
      # two processes took 14 min 21 s where one took 18 min 21 s.
      # --durations: every run (CI's too) ends with where the time went.
      'test': [PYTHON, '-m', 'pytest', '-n', str(_test_workers()),
               '--dist', 'loadscope', '--durations=25',
               os.path.join(ROOT, 'tests')],
  }
  if len(argv) < 2 or argv[1] not in commands:
    print(__doc__, file=sys.stderr)
    return 2
  ensure_venv()
  # pytest exits 5 when no test ran: that is a failure here too.
  return subprocess.run(commands[argv[1]] + argv[2:], cwd=ROOT).returncode


if __name__ == '__main__':
  sys.exit(main(sys.argv))
