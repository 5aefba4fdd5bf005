"""tpu_scripts/: the command lines they send, and what they do on a stand-in VM.

The scripts run with stand-in `gcloud` and `gsutil` executables first on
PATH, which record every call. The `gcloud ... ssh --command=C` stand-in
also runs C with bash in a stand-in VM: a home directory whose `mpl_tf` is
this repository (or, after install.sh, the copy it sent) and whose venv
`~/mpl_tf_venv/bin/python` is a stand-in that records pip calls (making
`.dist-info` records, so setup.sh's check reads real package metadata) and,
in place of main.py, prints its arguments and TPU environment and, when
training, runs until SIGTERM, then says it saved a checkpoint and exits.
So the VM-side scripts (tpu_scripts/vm/) run for real: the detached
training run, its log file, stop by SIGTERM, the log's copy to GCS.
"""

import glob
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS_DIR = os.path.join(REPO, 'tpu_scripts')
# The scripts you run on your machine (common.sh is sourced by them).
TPU_SCRIPTS = sorted(
    path for path in glob.glob(os.path.join(SCRIPTS_DIR, '*.sh'))
    if os.path.basename(path) != 'common.sh')
# The scripts that run on the TPU VM.
VM_SCRIPTS = sorted(glob.glob(os.path.join(SCRIPTS_DIR, 'vm', '*.sh')))
ENV = dict(PROJECT='p', ZONE='europe-west4-a', TPU_NAME='t', BUCKET='b')
LIBTPU_TF_INDEX = 'https://storage.googleapis.com/libtpu-tf-releases/index.html'


def _pinned_tf_version():
  with open(os.path.join(REPO, 'requirements.txt')) as f:
    return re.search(r'^tensorflow==(\S+)$', f.read(), re.M).group(1)


def _write_executable(path, text):
  with open(path, 'w') as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


# Stand-in gcloud: records its arguments; `describe` answers the accelerator
# type; `scp` copies into the stand-in VM; `ssh --command=C` runs C there
# with a VM's environment (not this one's: no PROJECT, TPU_NAME...).
_GCLOUD = '''#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ['FAKE_CALLS'], 'a') as f:
  f.write(json.dumps(['gcloud'] + args) + '\\n')
vm = os.environ['FAKE_VM_HOME']
if 'describe' in args:
  print(os.environ.get('FAKE_ACCELERATOR_TYPE', 'v3-8'))
elif 'scp' in args:
  source, target = args[args.index('scp') + 1:args.index('scp') + 3]
  shutil.copy(source, os.path.join(vm, target.split(':', 1)[1]))
elif 'ssh' in args:
  command = [a for a in args if a.startswith('--command=')][0]
  env = {{'PATH': os.environ['PATH'], 'HOME': vm,
         'FAKE_CALLS': os.environ['FAKE_CALLS']}}
  sys.exit(subprocess.run(['bash', '-c', command[len('--command='):]],
                          cwd=vm, env=env).returncode)
'''

_GSUTIL = '''#!{python}
import json, os, sys
with open(os.environ['FAKE_CALLS'], 'a') as f:
  f.write(json.dumps(['gsutil'] + sys.argv[1:]) + '\\n')
'''

# Stand-in for the VM's system python3 (only setup.sh uses it: to install
# uv with pip --user, which puts a stand-in uv in ~/.local/bin).
_PYTHON3 = '''#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ['FAKE_CALLS'], 'a') as f:
  f.write(json.dumps(['python3'] + args) + '\\n')
if args[:3] == ['-m', 'pip', 'install'] and any(
    a.startswith('uv==') for a in args):
  bin_dir = os.path.join(os.environ['HOME'], '.local', 'bin')
  os.makedirs(bin_dir, exist_ok=True)
  shutil.copy(os.path.join({bin!r}, 'uv-stand-in'),
              os.path.join(bin_dir, 'uv'))
'''

# Stand-in uv: `uv venv ... DIR` makes DIR/bin/python, the venv stand-in.
_UV = '''#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ['FAKE_CALLS'], 'a') as f:
  f.write(json.dumps(['uv'] + args) + '\\n')
venv = args[-1]
os.makedirs(os.path.join(venv, 'bin'), exist_ok=True)
shutil.copy(os.path.join({bin!r}, 'venv-python-stand-in'),
            os.path.join(venv, 'bin', 'python'))
'''

# Stand-in for the venv's python.
_VENV_PYTHON = '''#!{python}
import json, os, re, signal, sys, time
REAL_PYTHON = {python!r}
venv = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
site = os.path.join(venv, 'site')
args = sys.argv[1:]
with open(os.environ['FAKE_CALLS'], 'a') as f:
  f.write(json.dumps(['venv-python'] + args) + '\\n')

def install(name, version):
  os.makedirs(site, exist_ok=True)
  info = os.path.join(site, f"{{name.replace('-', '_')}}-{{version}}.dist-info")
  os.makedirs(info, exist_ok=True)
  with open(os.path.join(info, 'METADATA'), 'w') as f:
    f.write(f'Metadata-Version: 2.1\\nName: {{name}}\\nVersion: {{version}}\\n')
  if name == 'libtpu':
    os.makedirs(os.path.join(site, 'libtpu'), exist_ok=True)
    open(os.path.join(site, 'libtpu', '__init__.py'), 'w').close()
    open(os.path.join(site, 'libtpu', 'libtpu.so'), 'w').close()

if args[:3] == ['-m', 'pip', 'install']:
  wanted, rest = [], args[3:]
  while rest:
    arg = rest.pop(0)
    if arg in ('-r', '-f'):
      value = rest.pop(0)
      if arg == '-r':
        with open(value) as f:
          wanted += [l.strip() for l in f if re.match(r'^[\\w.-]+==', l)]
    elif '==' in arg:
      wanted.append(arg)
  wanted += os.environ.get('FAKE_PIP_ALSO', '').split()
  names = [w.split('==')[0] for w in wanted]
  if 'tensorflow-tpu' in names and 'libtpu' not in names:
    wanted.append('libtpu==0.0.14')  # what tensorflow-tpu asks for
  for requirement in wanted:
    install(*requirement.split('=='))
  sys.exit(0)
if args[:2] == ['-m', 'pip']:
  sys.exit(0)
if args and args[0] in ('-c', '-'):
  os.environ['PYTHONPATH'] = site
  os.execv(REAL_PYTHON, [REAL_PYTHON, '-S'] + args)  # -S: only the venv's
# main.py
keys = ('TPU_NAME', 'TPU_LOAD_LIBRARY', 'NEXT_PLUGGABLE_DEVICE_USE_C_API',
        'TF_PLUGGABLE_DEVICE_LIBRARY_PATH')
print('MAIN ' + json.dumps({{'args': args, 'cwd': os.getcwd(),
                             'env': {{k: os.environ.get(k) for k in keys}}}}),
      flush=True)
def on_sigterm(*_):
  print('SIGTERM: checkpoint saved', flush=True)
  sys.exit(0)
signal.signal(signal.SIGTERM, on_sigterm)
if any(a.startswith('--mode=') and a != '--mode=train' for a in args):
  sys.exit(0)
for _ in range(600):  # trains for at most 60 s, should a test not stop it
  time.sleep(0.1)
sys.exit(3)
'''


class TpuScriptsTest(unittest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
    self.bin_dir = os.path.join(self.tmp, 'bin')
    self.vm = os.path.join(self.tmp, 'vm')   # the stand-in VM's home
    os.makedirs(self.bin_dir)
    os.makedirs(self.vm)
    self.calls_path = os.path.join(self.tmp, 'calls')
    for name, text in (('gcloud', _GCLOUD), ('gsutil', _GSUTIL),
                       ('python3', _PYTHON3), ('uv-stand-in', _UV),
                       ('venv-python-stand-in', _VENV_PYTHON)):
      _write_executable(os.path.join(self.bin_dir, name),
                        text.format(python=sys.executable,
                                    bin=self.bin_dir))
    self.addCleanup(self._kill_runs)

  def _kill_runs(self):
    """Ends every process of the stand-in VM this test left running.

    They are the ones with HOME set to the stand-in VM's home: detached
    runs (with their wrapper) that a failing test did not stop. They must
    end before the stand-in executables' directory goes.
    """
    marker = b'\0' + f'HOME={self.vm}'.encode() + b'\0'
    for _ in range(50):
      left = []
      for environ in glob.glob('/proc/[0-9]*/environ'):
        try:
          with open(environ, 'rb') as f:
            if marker in b'\0' + f.read():
              left.append(int(environ.split('/')[2]))
        except OSError:
          pass
      if not left:
        return
      for pid in left:
        try:
          os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
      time.sleep(0.1)

  def _vm_with_repo(self):
    """The VM after install: ~/mpl_tf is this repository, the venv set up."""
    os.symlink(REPO, os.path.join(self.vm, 'mpl_tf'))
    venv = os.path.join(self.vm, 'mpl_tf_venv')
    os.makedirs(os.path.join(venv, 'bin'))
    shutil.copy(os.path.join(self.bin_dir, 'venv-python-stand-in'),
                os.path.join(venv, 'bin', 'python'))
    subprocess.run([os.path.join(venv, 'bin', 'python'), '-m', 'pip',
                    'install', 'tensorflow-tpu==' + _pinned_tf_version()],
                   check=True, env={'FAKE_CALLS': self.calls_path})
    os.remove(self.calls_path)

  def _run(self, script, *args, **env):
    return subprocess.run(
        ['bash', os.path.join(SCRIPTS_DIR, script), *args],
        capture_output=True, text=True, timeout=60,
        env={'PATH': f'{self.bin_dir}:/usr/bin:/bin',
             'FAKE_CALLS': self.calls_path, 'FAKE_VM_HOME': self.vm, **env})

  def _calls(self, tool=None):
    if not os.path.exists(self.calls_path):
      return []
    with open(self.calls_path) as f:
      calls = [json.loads(line) for line in f]
    os.remove(self.calls_path)
    return [c for c in calls if tool is None or c[0] == tool]

  @staticmethod
  def _ssh(call):
    """(worker, argv of the remote command after `cd mpl_tf &&`)."""
    worker = [a for a in call if a.startswith('--worker=')][0]
    command = [a for a in call if a.startswith('--command=')][0]
    command = command[len('--command='):]
    prefix = 'cd mpl_tf && '
    assert command.startswith(prefix), command
    return worker[len('--worker='):], shlex.split(command[len(prefix):])

  def _run_dir(self, run):
    return os.path.join(self.vm, 'mpl_tf_runs', run)

  def _main_record(self, text):
    lines = [l for l in text.splitlines() if l.startswith('MAIN ')]
    self.assertLen(lines, 1, text)
    return json.loads(lines[0][len('MAIN '):])

  def assertLen(self, sequence, length, msg=None):  # pylint: disable=invalid-name
    self.assertEqual(len(sequence), length, msg)

  def _wait_for(self, predicate, seconds=15):
    deadline = time.time() + seconds
    while time.time() < deadline:
      if predicate():
        return True
      time.sleep(0.1)
    return False

  # The scripts as files.

  def test_scripts_are_valid_bash_with_strict_mode(self):
    self.assertTrue(TPU_SCRIPTS)
    self.assertEqual(
        [os.path.basename(p) for p in VM_SCRIPTS],
        ['job.sh', 'python.sh', 'setup.sh'])
    for script in TPU_SCRIPTS + VM_SCRIPTS + [
        os.path.join(SCRIPTS_DIR, 'common.sh')]:
      result = subprocess.run(['bash', '-n', script], capture_output=True,
                              text=True)
      self.assertEqual(result.returncode, 0, result.stderr)
    for script in TPU_SCRIPTS + VM_SCRIPTS:
      with open(script) as f:
        self.assertIn('set -euo pipefail', f.read(), script)
    if shutil.which('shellcheck'):
      result = subprocess.run(['shellcheck', '-x', *TPU_SCRIPTS, *VM_SCRIPTS],
                              capture_output=True, text=True, cwd=REPO)
      self.assertEqual(result.returncode, 0, result.stdout)

  def test_missing_environment_is_a_clear_error_before_gcloud(self):
    for script in TPU_SCRIPTS:
      with self.subTest(script=os.path.basename(script)):
        result = self._run(os.path.basename(script), 'cifar10_4k')
        self.assertNotEqual(result.returncode, 0)
        self.assertIn('error:', result.stderr)
        self.assertIn('environment variables', result.stderr)
        self.assertRegex(result.stderr, 'PROJECT|ZONE|TPU_NAME|BUCKET')
        self.assertEqual(self._calls(), [], script)

  def test_unknown_preset_is_an_error_before_gcloud(self):
    for script in ('train.sh', 'evaluate.sh', 'export.sh'):
      with self.subTest(script=script):
        result = self._run(script, 'no_such_preset', **ENV)
        self.assertEqual(result.returncode, 2)
        self.assertIn('no preset', result.stderr)
        self.assertEqual(self._calls(), [])

  # install.sh and tpu_scripts/vm/setup.sh

  def test_install_puts_tensorflow_tpu_in_a_python_3_11_venv_on_every_worker(
      self):
    tf_version = _pinned_tf_version()
    result = self._run('install.sh', **ENV)
    self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
    calls = self._calls()
    gcloud = [c for c in calls if c[0] == 'gcloud']
    self.assertIn('scp', gcloud[0])
    self.assertIn('--worker=all', gcloud[0])
    self.assertIn('ssh', gcloud[1])
    self.assertIn('--worker=all', gcloud[1])  # every host: its input pipeline
    command = [a for a in gcloud[1] if a.startswith('--command=')][0]
    self.assertEqual(shlex.split(command)[-2:],
                     ['bash', 'tpu_scripts/vm/setup.sh'])
    # The copy on the VM is this tree.
    self.assertTrue(os.path.isfile(os.path.join(
        self.vm, 'mpl_tf', 'tpu_scripts', 'vm', 'setup.sh')))
    # uv, pinned, installed with pip --user; it makes a Python 3.11 venv.
    venv = os.path.join(self.vm, 'mpl_tf_venv')
    self.assertIn(['python3', '-m', 'pip', 'install', '--user', '--quiet',
                   'uv==0.13.9'], calls)
    self.assertIn(['uv', 'venv', '--seed', '--clear', '--python', '3.11',
                   venv], calls)
    # One pip resolve: requirements.txt without tensorflow==, tensorflow-tpu.
    installs = [c for c in calls
                if c[0] == 'venv-python' and c[1:4] == ['-m', 'pip', 'install']
                and '-r' in c]
    self.assertLen(installs, 1, calls)
    install = installs[0]
    self.assertIn(f'tensorflow-tpu=={tf_version}', install)
    self.assertNotIn(f'tensorflow=={tf_version}', install)
    self.assertEqual(install[install.index('-f') + 1], LIBTPU_TF_INDEX)
    with open(install[install.index('-r') + 1]) as f:
      requirements = f.read()
    self.assertNotRegex(requirements, r'(?m)^tensorflow==')
    self.assertRegex(requirements, r'(?m)^keras==')
    self.assertRegex(requirements, r'(?m)^numpy==')
    # What ended up in the venv, as setup.sh's own check read it.
    self.assertIn(f'tensorflow-tpu {tf_version}, libtpu 0.0.14',
                  result.stdout)
    site = os.listdir(os.path.join(venv, 'site'))
    self.assertIn(f'tensorflow_tpu-{tf_version}.dist-info', site)
    self.assertNotIn(f'tensorflow-{tf_version}.dist-info', site)   # CPU wheel

    # Again, with another Python and libtpu pinned: the venv is made again.
    result = self._run('install.sh', PYTHON_VERSION='3.12',
                       LIBTPU_VERSION='0.0.17', **ENV)
    self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
    calls = self._calls()
    self.assertIn(['uv', 'venv', '--seed', '--clear', '--python', '3.12',
                   venv], calls)
    install = [c for c in calls if c[0] == 'venv-python' and '-r' in c][0]
    self.assertIn('libtpu==0.0.17', install)

  def test_setup_refuses_a_venv_with_the_cpu_wheel_beside_tensorflow_tpu(self):
    self._vm_with_repo()
    result = subprocess.run(
        ['bash', os.path.join(SCRIPTS_DIR, 'vm', 'setup.sh')],
        capture_output=True, text=True, timeout=60,
        env={'PATH': f'{self.bin_dir}:/usr/bin:/bin', 'HOME': self.vm,
             'FAKE_CALLS': self.calls_path,
             'FAKE_PIP_ALSO': f'tensorflow=={_pinned_tf_version()}'})
    self.assertNotEqual(result.returncode, 0)
    self.assertIn('tensorflow', result.stderr)
    self.assertIn('beside tensorflow-tpu', result.stderr)

  # tpu_scripts/common.sh: single host or pod slice

  def test_topology_from_the_accelerator_type(self):
    for accelerator, topology in (
        ('v2-8', 'single'), ('v3-8', 'single'), ('v4-8', 'single'),
        ('v5p-8', 'single'), ('v5litepod-4', 'single'),
        ('v5litepod-8', 'single'), ('v6e-8', 'single'),
        ('v2-32', 'pod'), ('v3-32', 'pod'), ('v4-16', 'pod'),
        ('v4-32', 'pod'), ('v5litepod-16', 'pod'), ('v6e-16', 'pod'),
        ('v3-2048', 'pod')):
      with self.subTest(accelerator=accelerator):
        result = subprocess.run(
            ['bash', '-c', f'source {SCRIPTS_DIR}/common.sh && '
             f'tpu_topology {accelerator}'],
            capture_output=True, text=True)
        self.assertEqual(result.stdout.strip(), topology, result.stderr)
    result = subprocess.run(
        ['bash', '-c', f'source {SCRIPTS_DIR}/common.sh && tpu_topology v4'],
        capture_output=True, text=True)
    self.assertNotEqual(result.returncode, 0)
    self.assertIn('accelerator type', result.stderr)

  def test_create_picks_the_tensorflow_runtime_image_for_the_topology(self):
    tf_version = _pinned_tf_version()
    for accelerator, runtime in (('v3-8', f'tpu-vm-tf-{tf_version}-pjrt'),
                                 ('v4-8', f'tpu-vm-tf-{tf_version}-pjrt'),
                                 ('v3-32', f'tpu-vm-tf-{tf_version}-pod-pjrt'),
                                 ('v4-32', f'tpu-vm-tf-{tf_version}-pod-pjrt')):
      with self.subTest(accelerator=accelerator):
        result = self._run('create_tpu.sh', ACCELERATOR_TYPE=accelerator,
                           **ENV)
        self.assertEqual(result.returncode, 0, result.stderr)
        create = self._calls('gcloud')[0]
        self.assertIn(f'--accelerator-type={accelerator}', create)
        self.assertIn(f'--version={runtime}', create)
    self._run('create_tpu.sh', ACCELERATOR_TYPE='v3-8',
              TPU_RUNTIME_VERSION='tpu-ubuntu2204-base', **ENV)
    self.assertIn('--version=tpu-ubuntu2204-base', self._calls('gcloud')[0])

  # train.sh, logs.sh, stop.sh

  def _check_train_call(self, calls, preset, run, tpu, extra):
    ssh = [c for c in calls if c[0] == 'gcloud' and 'ssh' in c]
    self.assertLen(ssh, 1, calls)
    worker, remote = self._ssh(ssh[0])
    self.assertEqual(worker, '0')   # one client, on worker 0, also on a pod
    launch = (['bash', 'tpu_scripts/vm/python.sh', 'local'] if tpu == 'local'
              else ['bash', 'tpu_scripts/vm/python.sh', 'pod', tpu])
    self.assertEqual(remote, [
        'bash', 'tpu_scripts/vm/job.sh', 'start', run,
        f'--copy-log-to=gs://b/runs/{run}/train.log', '--', *launch,
        'main.py', f'--flagfile=flags/{preset}.cfg',
        f'--data_dir=gs://b/data/{preset}', f'--model_dir=gs://b/runs/{run}',
        '--strategy=tpu', f'--tpu={tpu}', *extra])

  def test_train_single_host_runs_detached_logs_and_stops_on_sigterm(self):
    self._vm_with_repo()
    # No ACCELERATOR_TYPE: train.sh asks gcloud, which says v3-8.
    launcher = subprocess.Popen(
        ['bash', os.path.join(SCRIPTS_DIR, 'train.sh'), 'cifar10_4k',
         '--num_steps=10'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
        env={'PATH': f'{self.bin_dir}:/usr/bin:/bin',
             'FAKE_CALLS': self.calls_path, 'FAKE_VM_HOME': self.vm,
             'FAKE_ACCELERATOR_TYPE': 'v3-8', **ENV})
    stdout, stderr = launcher.communicate(timeout=60)
    self.assertEqual(launcher.returncode, 0, stderr)
    self.assertIn('started run cifar10_4k', stdout)
    calls = self._calls()
    describe = [c for c in calls if 'describe' in c]
    self.assertLen(describe, 1)
    self._check_train_call(calls, 'cifar10_4k', 'cifar10_4k', 'local',
                           ['--num_steps=10'])

    # train.sh (the SSH session) has returned; the run goes on, in a session
    # of its own, and the end of the launcher's session does not stop it.
    run_dir = self._run_dir('cifar10_4k')
    log = os.path.join(run_dir, 'train.log')
    with open(os.path.join(run_dir, 'train.pid')) as f:
      pid = int(f.read())
    self.assertNotEqual(os.getsid(pid), launcher.pid)
    try:
      os.killpg(launcher.pid, signal.SIGHUP)
    except ProcessLookupError:
      pass
    self.assertTrue(self._wait_for(
        lambda: 'MAIN ' in open(log).read()), open(log).read())
    time.sleep(0.5)
    os.kill(pid, 0)   # still running
    record = self._main_record(open(log).read())
    self.assertEqual(os.path.realpath(record['cwd']), REPO)
    self.assertEqual(record['args'][-3:], ['--strategy=tpu', '--tpu=local',
                                           '--num_steps=10'])
    # A single-host TPU VM: PJRT with the venv's libtpu, which it loads.
    self.assertEqual(record['env']['NEXT_PLUGGABLE_DEVICE_USE_C_API'], 'true')
    self.assertEqual(record['env']['TF_PLUGGABLE_DEVICE_LIBRARY_PATH'],
                     os.path.join(self.vm, 'mpl_tf_venv', 'site', 'libtpu',
                                  'libtpu.so'))
    self.assertIsNone(record['env']['TPU_LOAD_LIBRARY'])
    self.assertIsNone(record['env']['TPU_NAME'])

    # A second run of the same name is refused while this one runs.
    result = self._run('train.sh', 'cifar10_4k', ACCELERATOR_TYPE='v3-8',
                       **ENV)
    self.assertNotEqual(result.returncode, 0)
    self.assertIn('already running', result.stderr)
    self._calls()

    # logs.sh shows the state and the log.
    result = self._run('logs.sh', 'cifar10_4k', '--no-follow', **ENV)
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertIn(f'run cifar10_4k: running, pid {pid}', result.stdout)
    self.assertIn('MAIN ', result.stdout)
    self.assertIn('--worker=0', self._calls('gcloud')[0])

    # stop.sh: SIGTERM; the run saves a checkpoint and exits; the log goes
    # to the run directory in GCS.
    result = self._run('stop.sh', 'cifar10_4k', STOP_WAIT='30', **ENV)
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertIn('sent SIGTERM', result.stdout)
    self.assertIn('exited with code 0', result.stdout)
    calls = self._calls()
    worker, remote = self._ssh([c for c in calls if c[0] == 'gcloud'][0])
    self.assertEqual((worker, remote), ('0', [
        'bash', 'tpu_scripts/vm/job.sh', 'stop', 'cifar10_4k', '--wait=30']))
    with open(log) as f:
      text = f.read()
    self.assertIn('SIGTERM: checkpoint saved', text)
    self.assertIn('exited with code 0', text)
    with open(os.path.join(run_dir, 'exit_code')) as f:
      self.assertEqual(f.read().strip(), '0')
    self.assertFalse(os.path.exists(os.path.join(run_dir, 'train.pid')))
    self.assertIn(['gsutil', '-q', 'cp', log,
                   'gs://b/runs/cifar10_4k/train.log'], calls)
    self.assertRaises(ProcessLookupError, os.kill, pid, 0)
    # Stopping again: nothing runs.
    result = self._run('stop.sh', 'cifar10_4k', **ENV)
    self.assertEqual(result.returncode, 2)
    self.assertIn('not running', result.stderr)

  def test_train_pod_slice_runs_one_client_on_worker_0_with_the_tpu_name(self):
    self._vm_with_repo()
    for how, env in (('gcloud describe', {'FAKE_ACCELERATOR_TYPE': 'v4-32'}),
                     ('ACCELERATOR_TYPE', {'ACCELERATOR_TYPE': 'v3-32',
                                           'RUN_NAME': 'seed1'})):
      with self.subTest(how=how):
        result = self._run('train.sh', 'imagenet_10pct', '--seed=1', **env,
                           **ENV)
        self.assertEqual(result.returncode, 0, result.stderr)
        calls = self._calls()
        self.assertEqual(any('describe' in c for c in calls),
                         how == 'gcloud describe')
        run = env.get('RUN_NAME', 'imagenet_10pct')
        self._check_train_call(calls, 'imagenet_10pct', run, 't',
                               ['--seed=1'])
        log = os.path.join(self._run_dir(run), 'train.log')
        self.assertTrue(self._wait_for(lambda: 'MAIN ' in open(log).read()))
        record = self._main_record(open(log).read())
        self.assertEqual(record['env'], {
            'TPU_NAME': 't', 'TPU_LOAD_LIBRARY': '0',
            'NEXT_PLUGGABLE_DEVICE_USE_C_API': None,
            'TF_PLUGGABLE_DEVICE_LIBRARY_PATH': None})
        result = self._run('stop.sh', run, STOP_WAIT='30', **ENV)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(['gsutil', '-q', 'cp', log,
                       f'gs://b/runs/{run}/train.log'], self._calls())

  def test_sigterm_to_the_whole_run_also_checkpoints_and_copies_the_log(self):
    # As when the VM shuts down: the wrapper gets SIGTERM too. It passes it
    # on, waits for main.py, and still records the end and copies the log.
    self._vm_with_repo()
    result = subprocess.run(
        ['bash', 'tpu_scripts/vm/job.sh', 'start', 'r',
         '--copy-log-to=gs://b/runs/r/train.log', '--',
         'bash', 'tpu_scripts/vm/python.sh', 'local', 'main.py'],
        cwd=os.path.join(self.vm, 'mpl_tf'), capture_output=True, text=True,
        timeout=60, env={'PATH': f'{self.bin_dir}:/usr/bin:/bin',
                         'HOME': self.vm, 'FAKE_CALLS': self.calls_path})
    self.assertEqual(result.returncode, 0, result.stderr)
    run_dir = self._run_dir('r')
    with open(os.path.join(run_dir, 'train.pid')) as f:
      pid = int(f.read())
    log = os.path.join(run_dir, 'train.log')
    self.assertTrue(self._wait_for(lambda: 'MAIN ' in open(log).read()))
    wrapper = os.getsid(pid)   # the session's leader, job.sh's wrapper
    self.assertNotEqual(wrapper, pid)
    os.kill(wrapper, signal.SIGTERM)
    self.assertTrue(self._wait_for(
        lambda: os.path.exists(os.path.join(run_dir, 'exit_code'))))
    with open(os.path.join(run_dir, 'exit_code')) as f:
      self.assertEqual(f.read().strip(), '0')
    self.assertIn('SIGTERM: checkpoint saved', open(log).read())
    self.assertIn(['gsutil', '-q', 'cp', log, 'gs://b/runs/r/train.log'],
                  self._calls())

  # evaluate.sh and export.sh

  def test_evaluate_uses_the_tpu_from_worker_0(self):
    self._vm_with_repo()
    for accelerator, tpu, env in (
        ('v3-8', 'local', {'NEXT_PLUGGABLE_DEVICE_USE_C_API': 'true'}),
        ('v4-32', 't', {'TPU_NAME': 't', 'TPU_LOAD_LIBRARY': '0'})):
      with self.subTest(accelerator=accelerator):
        result = self._run('evaluate.sh', 'imagenet_10pct', '--num_steps=10',
                           ACCELERATOR_TYPE=accelerator, **ENV)
        self.assertEqual(result.returncode, 0, result.stderr)
        worker, remote = self._ssh(self._calls('gcloud')[0])
        self.assertEqual(worker, '0')
        self.assertEqual(remote[remote.index('main.py') + 1:], [
            '--flagfile=flags/imagenet_10pct.cfg',
            '--data_dir=gs://b/data/imagenet_10pct',
            '--model_dir=gs://b/runs/imagenet_10pct', '--mode=eval',
            '--strategy=tpu', f'--tpu={tpu}', '--num_steps=10'])
        record = self._main_record(result.stdout)
        for key, value in env.items():
          self.assertEqual(record['env'][key], value)

  def test_export_writes_a_numbered_version_directory_from_the_cpu(self):
    self._vm_with_repo()
    result = self._run('export.sh', 'cifar10_4k', '--num_steps=10', **ENV)
    self.assertEqual(result.returncode, 0, result.stderr)
    calls = self._calls('gcloud')
    self.assertFalse([c for c in calls if 'describe' in c])
    worker, remote = self._ssh(calls[0])
    self.assertEqual(worker, '0')
    self.assertEqual(remote, [
        'bash', 'tpu_scripts/vm/python.sh', 'cpu', 'main.py',
        '--flagfile=flags/cifar10_4k.cfg', '--data_dir=gs://b/data/cifar10_4k',
        '--model_dir=gs://b/runs/cifar10_4k', '--mode=export',
        '--strategy=one_device', '--export_dir=gs://b/runs/cifar10_4k/export/1',
        '--num_steps=10'])
    export_dir = [a for a in remote if a.startswith('--export_dir=')][0]
    self.assertTrue(export_dir.endswith('/export/1'))
    record = self._main_record(result.stdout)
    self.assertEqual(record['env']['TPU_LOAD_LIBRARY'], '0')
    self.assertIsNone(record['env']['TF_PLUGGABLE_DEVICE_LIBRARY_PATH'])

  def test_stage_data_mirrors_and_copies_the_manifest_last(self):
    data_dir = os.path.join(self.tmp, 'cifar10_4k')
    os.makedirs(data_dir)
    for name in ('manifest.json', 'labeled-00000-of-00001.tfrecord'):
      with open(os.path.join(data_dir, name), 'w') as f:
        f.write('x')
    result = self._run('stage_data.sh', data_dir, **ENV)
    self.assertEqual(result.returncode, 0, result.stderr)
    target = 'gs://b/data/cifar10_4k'
    # A bucket has no atomic rename: the old marker goes first, the shards
    # next (without the manifest), the manifest last. The shards are
    # mirrored: -d deletes objects the source lacks (stale shards of an
    # earlier preparation).
    self.assertEqual(self._calls('gsutil'), [
        ['gsutil', '-q', 'rm', f'{target}/manifest.json'],
        ['gsutil', '-m', 'rsync', '-r', '-d', '-x', r'^manifest\.json$',
         data_dir, target],
        ['gsutil', 'cp', os.path.join(data_dir, 'manifest.json'),
         f'{target}/manifest.json']])


if __name__ == '__main__':
  unittest.main()
