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
training run, its log file, stop by SIGTERM, the log's copy to GCS, and
setup.sh's version check (vm/check_versions.py) on the stand-in venv's
package records, with fake runtime images and TPU runtime unit files. The
stand-in gcloud also answers a zone's image list and a project's firewall
rules, for create_tpu.sh's choices.
"""

import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
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
# The libtpu released with each pinned tensorflow-tpu (README.md, "TPU
# software": tensorflow-tpu 2.20.0's wheel asks for libtpu~=0.0.14, 0.0.14
# its floor; 2.19.1 pinned ==0.0.10, 2.18.0 ==2.18.0), and the newest 0.0.x
# on PyPI when this was written, which pip would take without a pin.
PAIRED_LIBTPU = {'2.20.0': '0.0.14'}
NEWEST_LIBTPU = '0.0.52'
# Google's pre-populated rules of a project's `default` network, as
# create_tpu.sh's --format prints them (name|network|direction|sources|
# allowed|disabled|target tags|target service accounts).
DEFAULT_NETWORK_RULES = '\n'.join((
    'default-allow-internal|default|INGRESS|10.128.0.0/9|'
    'tcp:0-65535,udp:0-65535,icmp|False||',
    'default-allow-ssh|default|INGRESS|0.0.0.0/0|tcp:22|False||',
    'default-allow-rdp|default|INGRESS|0.0.0.0/0|tcp:3389|False||',
    'default-allow-icmp|default|INGRESS|0.0.0.0/0|icmp|False||'))


def _pinned_tf_version():
  with open(os.path.join(REPO, 'requirements.txt')) as f:
    return re.search(r'^tensorflow==(\S+)$', f.read(), re.M).group(1)


def _load_check_versions():
  """tpu_scripts/vm/check_versions.py as a module (it is not in a package)."""
  spec = importlib.util.spec_from_file_location(
      'check_versions', os.path.join(SCRIPTS_DIR, 'vm', 'check_versions.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _write_executable(path, text):
  with open(path, 'w') as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


# Stand-in gcloud: records its arguments; `describe` answers the accelerator
# type (and the runtime image, when asked); `versions list` answers the
# images of FAKE_RUNTIME_VERSIONS, `firewall-rules list` the rules of
# FAKE_FIREWALL_RULES (as the scripts' --format prints them); `scp` copies
# into the stand-in VM; `ssh --command=C` runs C there with a VM's
# environment (not this one's: no PROJECT, TPU_NAME...).
_GCLOUD = '''#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ['FAKE_CALLS'], 'a') as f:
  f.write(json.dumps(['gcloud'] + args) + '\\n')
vm = os.environ['FAKE_VM_HOME']
if 'describe' in args:
  accelerator = os.environ.get('FAKE_ACCELERATOR_TYPE', 'v3-8')
  if any('runtimeVersion' in a for a in args):
    print(accelerator + '\\t' + os.environ.get('FAKE_RUNTIME_VERSION', ''))
  else:
    print(accelerator)
elif 'versions' in args and 'list' in args:
  print('\\n'.join(os.environ.get('FAKE_RUNTIME_VERSIONS', '').split()))
elif 'firewall-rules' in args and 'list' in args:
  print(os.environ.get('FAKE_FIREWALL_RULES', ''))
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
import json, os, re, shutil, signal, sys, time
REAL_PYTHON = {python!r}
NEWEST_LIBTPU = {newest_libtpu!r}
venv = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
site = os.path.join(venv, 'site')
args = sys.argv[1:]
with open(os.environ['FAKE_CALLS'], 'a') as f:
  f.write(json.dumps(['venv-python'] + args) + '\\n')

def install(name, version):
  os.makedirs(site, exist_ok=True)
  for old in os.listdir(site):  # pip keeps one version of a package
    if (old.endswith('.dist-info') and
        old[:-len('.dist-info')].rsplit('-', 1)[0] == name.replace('-', '_')):
      shutil.rmtree(os.path.join(site, old))
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
    # tensorflow-tpu 2.20.0 asks for libtpu~=0.0.14: pip takes the newest.
    wanted.append('libtpu==' + NEWEST_LIBTPU)
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
                                    bin=self.bin_dir,
                                    newest_libtpu=NEWEST_LIBTPU))
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
    tf_version = _pinned_tf_version()
    return subprocess.run(
        ['bash', os.path.join(SCRIPTS_DIR, script), *args],
        capture_output=True, text=True, timeout=60,
        env={'PATH': f'{self.bin_dir}:/usr/bin:/bin',
             'FAKE_CALLS': self.calls_path, 'FAKE_VM_HOME': self.vm,
             # The zone offers the documented TensorFlow images.
             'FAKE_RUNTIME_VERSIONS': f'tpu-vm-tf-{tf_version}-pjrt '
                                      f'tpu-vm-tf-{tf_version}-pod-pjrt '
                                      'tpu-vm-tf-2.16.1-pjrt '
                                      'tpu-ubuntu2204-base',
             'FAKE_FIREWALL_RULES': DEFAULT_NETWORK_RULES, **env})

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
    image = f'tpu-vm-tf-{tf_version}-pjrt'
    result = self._run('install.sh', FAKE_RUNTIME_VERSION=image, **ENV)
    self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
    calls = self._calls()
    gcloud = [c for c in calls if c[0] == 'gcloud']
    self.assertIn('describe', gcloud[0])   # the type and image, for the check
    self.assertIn('scp', gcloud[1])
    self.assertIn('--worker=all', gcloud[1])
    self.assertIn('ssh', gcloud[2])
    self.assertIn('--worker=all', gcloud[2])  # every host: same pins, checked
    command = [a for a in gcloud[2] if a.startswith('--command=')][0]
    self.assertEqual(shlex.split(command)[-4:], [
        'ACCELERATOR_TYPE=v3-8', f'TPU_RUNTIME_VERSION={image}',
        'bash', 'tpu_scripts/vm/setup.sh'])
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
    # libtpu pinned to the build paired with it, not tensorflow-tpu's ~=.
    self.assertIn(f'libtpu=={PAIRED_LIBTPU[tf_version]}', install)
    self.assertNotIn(f'tensorflow=={tf_version}', install)
    self.assertEqual(install[install.index('-f') + 1], LIBTPU_TF_INDEX)
    with open(install[install.index('-r') + 1]) as f:
      requirements = f.read()
    self.assertNotRegex(requirements, r'(?m)^tensorflow==')
    self.assertRegex(requirements, r'(?m)^keras==')
    self.assertRegex(requirements, r'(?m)^numpy==')
    # What ended up in the venv, as setup.sh's own check read it.
    self.assertIn(f'tensorflow-tpu {tf_version}, libtpu '
                  f'{PAIRED_LIBTPU[tf_version]}', result.stdout)
    self.assertIn(f'image {image} on v3-8', result.stdout)
    site = os.listdir(os.path.join(venv, 'site'))
    self.assertIn(f'tensorflow_tpu-{tf_version}.dist-info', site)
    self.assertNotIn(f'tensorflow-{tf_version}.dist-info', site)   # CPU wheel

    # Again, with another Python and libtpu pinned: the venv is made again.
    result = self._run('install.sh', PYTHON_VERSION='3.12',
                       LIBTPU_VERSION='0.0.17', FAKE_RUNTIME_VERSION=image,
                       **ENV)
    self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
    calls = self._calls()
    self.assertIn(['uv', 'venv', '--seed', '--clear', '--python', '3.12',
                   venv], calls)
    install = [c for c in calls if c[0] == 'venv-python' and '-r' in c][0]
    self.assertIn('libtpu==0.0.17', install)

  def test_install_on_a_pod_slice_checks_the_runtime_of_every_host(self):
    # The stand-in host runs no TPU runtime (no tpu-runtime.service), as a
    # pod host from a base image would not: the install stops there, before
    # pip, saying so; with TPU_RUNTIME_VERSION it goes as far as the check.
    tf_version = _pinned_tf_version()
    result = self._run('install.sh', FAKE_ACCELERATOR_TYPE='v4-32',
                       FAKE_RUNTIME_VERSION=f'tpu-vm-tf-{tf_version}-pod-pjrt',
                       **ENV)
    self.assertEqual(result.returncode, 2, result.stdout)
    self.assertIn(f'TPU software of host {socket.gethostname()} does not '
                  'agree', result.stderr)
    self.assertIn('found no /etc/systemd/system/tpu-runtime.service on this '
                  'host of a multi-host slice', result.stderr)
    calls = self._calls()
    ssh = [c for c in calls if c[0] == 'gcloud' and 'ssh' in c]
    self.assertIn('--worker=all', ssh[0])
    self.assertFalse([c for c in calls if c[0] == 'venv-python'
                      and c[1:4] == ['-m', 'pip', 'install']])

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

  def _setup(self, **env):
    """Runs vm/setup.sh in the stand-in VM (after install: _vm_with_repo)."""
    return subprocess.run(
        ['bash', os.path.join(SCRIPTS_DIR, 'vm', 'setup.sh')],
        capture_output=True, text=True, timeout=60,
        env={'PATH': f'{self.bin_dir}:/usr/bin:/bin', 'HOME': self.vm,
             'FAKE_CALLS': self.calls_path, **env})

  def test_version_check_names_what_it_found_and_what_it_expected(self):
    checks = _load_check_versions()
    tf_version = _pinned_tf_version()
    libtpu = PAIRED_LIBTPU[tf_version]
    good = {'tensorflow-tpu': tf_version, 'libtpu': libtpu}
    self.assertEqual(checks.package_problems(good, tf_version, libtpu), [])
    for found, message in (
        (dict(good, libtpu=NEWEST_LIBTPU),
         f'libtpu: found {NEWEST_LIBTPU}, expected {libtpu} (the build paired '
         f'with tensorflow-tpu {tf_version}'),
        (dict(good, libtpu=None), f'libtpu: found none, expected {libtpu}'),
        (dict(good, **{'tensorflow-tpu': '2.19.1'}),
         f'tensorflow-tpu: found 2.19.1, expected {tf_version} '
         f'(requirements.txt pins tensorflow=={tf_version})'),
        (dict(good, tensorflow=tf_version),
         f'tensorflow {tf_version} is installed beside tensorflow-tpu')):
      with self.subTest(found=found):
        problems = checks.package_problems(found, tf_version, libtpu)
        self.assertLen(problems, 1)
        self.assertIn(message, problems[0])
        self.assertRegex(problems[0], 'rerun tpu_scripts/install.sh|uninstall')

    service = ('[Service]\nEnvironment="TF_DOCKER_URL=gcr.io/cloud-tpu-v2-images/'
               'grpc_tpu_worker:tf-{}-pjrt"\n')
    image = f'tpu-vm-tf-{tf_version}-pjrt'
    pod_image = f'tpu-vm-tf-{tf_version}-pod-pjrt'
    agreeing = (
        (image, 'v3-8', None), (f'{image}-v5p-and-below', 'v4-8', None),
        (f'{image}-v5e-and-v6', 'v6e-8', None), ('v2-alpha-tpuv6e', 'v6e-8',
                                                 None),
        (pod_image, 'v4-32', service.format(tf_version)),
        (f'{pod_image}-v5e-and-v6', 'v5litepod-16', service.format(tf_version)),
        ('', 'v4-32', None))   # nothing to check against
    for args in agreeing:
      with self.subTest(args=args):
        self.assertEqual(checks.image_problems(*args[:2], tf_version, args[2]),
                         [])
    for (runtime, accelerator, text), messages in (
        (('tpu-vm-tf-2.18.0-pjrt', 'v3-8', None),
         ['runtime image: found tpu-vm-tf-2.18.0-pjrt (TensorFlow 2.18.0), '
          f'expected tpu-vm-tf-{tf_version}-pjrt-v5p-and-below or {image} '
          f'(TensorFlow {tf_version}', 'recreate the TPU']),
        ((f'tpu-vm-tf-{tf_version}-se', 'v3-8', None), ['a -pjrt image']),
        ((pod_image, 'v3-8', None), ['-pod is for multi-host slices only']),
        ((image, 'v3-32', service.format(tf_version)),
         ['-pod is for multi-host slices only']),
        ((f'{image}-v5p-and-below', 'v6e-8', None),
         ['made for v2, v3, v4, v5p, on v6e-8']),
        (('my-image', 'v3-8', None), ['runtime image: found my-image']),
        # A pod slice: this host must serve the client's TensorFlow.
        ((pod_image, 'v4-32', service.format('2.19.0')),
         ['TPU runtime: this host serves TensorFlow 2.19.0 (TF_DOCKER_URL='
          'gcr.io/cloud-tpu-v2-images/grpc_tpu_worker:tf-2.19.0-pjrt in '
          f'/etc/systemd/system/tpu-runtime.service), expected {tf_version}',
          f'grpc_tpu_worker:tf-{tf_version}-pjrt', 'restart tpu-runtime']),
        ((pod_image, 'v4-32', '[Service]\n'),
         ['serves TensorFlow unknown (TF_DOCKER_URL=not set']),
        ((pod_image, 'v4-32', None),
         ['found no /etc/systemd/system/tpu-runtime.service']),
        (('tpu-ubuntu2204-base', 'v4-32', None),
         ['found no /etc/systemd/system/tpu-runtime.service'])):
      with self.subTest(runtime=runtime, accelerator=accelerator):
        problems = checks.image_problems(runtime, accelerator, tf_version,
                                         text)
        self.assertLen(problems, 1, problems)
        for message in messages:
          self.assertIn(message, problems[0])

  def test_setup_stops_on_a_version_mismatch_with_what_was_found(self):
    self._vm_with_repo()
    tf_version = _pinned_tf_version()
    service = os.path.join(self.tmp, 'tpu-runtime.service')
    pod = {'ACCELERATOR_TYPE': 'v4-32', 'TPU_RUNTIME_SERVICE': service,
           'TPU_RUNTIME_VERSION': f'tpu-vm-tf-{tf_version}-pod-pjrt'}
    # This pod host's runtime serves another TensorFlow: stopped before pip.
    with open(service, 'w') as f:
      f.write('Environment="TF_DOCKER_URL=gcr.io/cloud-tpu-v2-images/'
              'grpc_tpu_worker:tf-2.19.0-pjrt"\n')
    result = self._setup(**pod)
    self.assertEqual(result.returncode, 2, result.stdout)
    self.assertIn('does not agree with this checkout', result.stderr)
    self.assertIn('serves TensorFlow 2.19.0 (TF_DOCKER_URL=', result.stderr)
    self.assertFalse([c for c in self._calls() if c[1:3] == ['-m', 'pip']])
    # It serves the client's: installed and checked.
    with open(service, 'w') as f:
      f.write('Environment="TF_DOCKER_URL=gcr.io/cloud-tpu-v2-images/'
              f'grpc_tpu_worker:tf-{tf_version}-pjrt"\n')
    result = self._setup(**pod)
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertIn(f'libtpu {PAIRED_LIBTPU[tf_version]}', result.stdout)
    self._calls()
    # pip resolved another libtpu than the pinned one: named, exit 2.
    result = self._setup(FAKE_PIP_ALSO=f'libtpu=={NEWEST_LIBTPU}', **pod)
    self.assertEqual(result.returncode, 2, result.stdout)
    self.assertIn(f'libtpu: found {NEWEST_LIBTPU}, expected '
                  f'{PAIRED_LIBTPU[tf_version]}', result.stderr)
    self._calls()
    # A TensorFlow pin with no libtpu paired yet: stopped before installing.
    other = os.path.join(self.tmp, 'other_checkout')
    os.makedirs(os.path.join(other, 'tpu_scripts'))
    shutil.copytree(os.path.join(SCRIPTS_DIR, 'vm'),
                    os.path.join(other, 'tpu_scripts', 'vm'))
    with open(os.path.join(other, 'requirements.txt'), 'w') as f:
      f.write('tensorflow==2.99.0\nnumpy==2.4.6\n')
    setup = os.path.join(other, 'tpu_scripts', 'vm', 'setup.sh')
    env = {'PATH': f'{self.bin_dir}:/usr/bin:/bin', 'HOME': self.vm,
           'FAKE_CALLS': self.calls_path}
    result = subprocess.run(['bash', setup], capture_output=True, text=True,
                            timeout=60, env=env)
    self.assertEqual(result.returncode, 2)
    self.assertIn('no libtpu is paired with tensorflow-tpu 2.99.0',
                  result.stderr)
    self.assertIn('LIBTPU_VERSION', result.stderr)
    self.assertEqual(self._calls(), [])
    result = subprocess.run(['bash', setup], capture_output=True, text=True,
                            timeout=60, env=dict(env, LIBTPU_VERSION='0.0.30'))
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertIn('tensorflow-tpu 2.99.0, libtpu 0.0.30', result.stdout)

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

  def _bash(self, command, **env):
    """Runs COMMAND after sourcing common.sh, with the stand-ins first."""
    return subprocess.run(
        ['bash', '-c', f'source {SCRIPTS_DIR}/common.sh && {command}'],
        capture_output=True, text=True,
        env={'PATH': f'{self.bin_dir}:/usr/bin:/bin',
             'FAKE_CALLS': self.calls_path, 'FAKE_VM_HOME': self.vm, **env})

  def _create_call(self, calls):
    creates = [c for c in calls if c[:5] == ['gcloud', 'compute', 'tpus',
                                             'tpu-vm', 'create']]
    return creates[0] if creates else None

  def test_runtime_images_per_generation(self):
    # Google's TensorFlow image names (tpu-vm-tf-X.Y.Z[-pod]-pjrt, every
    # generation here) after the generation-suffixed ones Google lists for
    # TF 2.18; the framework-neutral image of each generation.
    checks = _load_check_versions()
    for accelerator, suffix, pod, base in (
        ('v2-8', '-v5p-and-below', '', 'tpu-ubuntu2204-base'),
        ('v3-8', '-v5p-and-below', '', 'tpu-ubuntu2204-base'),
        ('v3-32', '-v5p-and-below', '-pod', 'tpu-ubuntu2204-base'),
        ('v4-8', '-v5p-and-below', '', 'tpu-ubuntu2204-base'),
        ('v4-32', '-v5p-and-below', '-pod', 'tpu-ubuntu2204-base'),
        ('v5p-8', '-v5p-and-below', '', 'v2-alpha-tpuv5'),
        ('v5p-16', '-v5p-and-below', '-pod', 'v2-alpha-tpuv5'),
        ('v5litepod-8', '-v5e-and-v6', '', 'v2-alpha-tpuv5-lite'),
        ('v5litepod-16', '-v5e-and-v6', '-pod', 'v2-alpha-tpuv5-lite'),
        ('v6e-8', '-v5e-and-v6', '', 'v2-alpha-tpuv6e'),
        ('v6e-256', '-v5e-and-v6', '-pod', 'v2-alpha-tpuv6e')):
      with self.subTest(accelerator=accelerator):
        expected = [f'tpu-vm-tf-2.20.0{pod}-pjrt{suffix}',
                    f'tpu-vm-tf-2.20.0{pod}-pjrt']
        result = self._bash(f'tf_runtime_candidates {accelerator} 2.20.0')
        self.assertEqual(result.stdout.split(), expected, result.stderr)
        # The setup check expects what create_tpu.sh picks from.
        self.assertEqual(
            list(checks.expected_images('2.20.0', accelerator)), expected)
        self.assertEqual(self._bash(f'base_runtime {accelerator}').stdout,
                         base + '\n')
    result = self._bash('tf_runtime_candidates v7x-8 2.20.0')
    self.assertEqual(result.returncode, 2)
    self.assertIn("no TensorFlow runtime image is documented for accelerator "
                  "type 'v7x-8'", result.stderr)

  def test_create_picks_the_tensorflow_runtime_image_for_the_topology(self):
    tf_version = _pinned_tf_version()
    suffixed = ' '.join(
        f'tpu-vm-tf-{tf_version}{pod}-pjrt{suffix}' for pod in ('', '-pod')
        for suffix in ('', '-v5p-and-below', '-v5e-and-v6'))
    older = 'tpu-vm-tf-2.18.0-pod-pjrt tpu-vm-tf-2.18.0-pjrt v2-alpha-tpuv6e'
    for accelerator, offered, runtime in (
        # The zone offers the documented names only (_run's default).
        ('v3-8', None, f'tpu-vm-tf-{tf_version}-pjrt'),
        ('v4-8', None, f'tpu-vm-tf-{tf_version}-pjrt'),
        ('v3-32', None, f'tpu-vm-tf-{tf_version}-pod-pjrt'),
        ('v4-32', None, f'tpu-vm-tf-{tf_version}-pod-pjrt'),
        # It offers generation-suffixed images too: the generation's wins.
        ('v3-8', suffixed, f'tpu-vm-tf-{tf_version}-pjrt-v5p-and-below'),
        ('v5p-16', suffixed,
         f'tpu-vm-tf-{tf_version}-pod-pjrt-v5p-and-below'),
        ('v5litepod-16', suffixed,
         f'tpu-vm-tf-{tf_version}-pod-pjrt-v5e-and-v6'),
        ('v6e-8', suffixed, f'tpu-vm-tf-{tf_version}-pjrt-v5e-and-v6'),
        # None for this TensorFlow: one host runs from the base image.
        ('v6e-8', older, 'v2-alpha-tpuv6e'),
        ('v4-8', older, 'tpu-ubuntu2204-base')):
      with self.subTest(accelerator=accelerator, offered=offered):
        env = {} if offered is None else {'FAKE_RUNTIME_VERSIONS': offered}
        result = self._run('create_tpu.sh', ACCELERATOR_TYPE=accelerator,
                           **env, **ENV)
        self.assertEqual(result.returncode, 0, result.stderr)
        calls = self._calls('gcloud')
        self.assertIn(['gcloud', 'compute', 'tpus', 'tpu-vm', 'versions',
                       'list', '--project=p', '--zone=europe-west4-a',
                       '--format=value(version)'], calls)
        create = self._create_call(calls)
        self.assertIn(f'--accelerator-type={accelerator}', create)
        self.assertIn(f'--version={runtime}', create)
        self.assertIn(f'runtime image: {runtime}', result.stdout)
    # A pod slice without its TensorFlow's image is refused: its hosts would
    # serve another TensorFlow than the client's.
    result = self._run('create_tpu.sh', ACCELERATOR_TYPE='v4-32',
                       FAKE_RUNTIME_VERSIONS=older, **ENV)
    self.assertEqual(result.returncode, 2)
    self.assertIn(f'offers no TensorFlow {tf_version} pod image for v4-32',
                  result.stderr)
    self.assertIn('tpu-vm-tf-2.18.0-pod-pjrt tpu-vm-tf-2.18.0-pjrt',
                  result.stderr)   # what the zone has instead
    self.assertIsNone(self._create_call(self._calls()))
    # TPU_RUNTIME_VERSION is taken as it is.
    self._run('create_tpu.sh', ACCELERATOR_TYPE='v3-8',
              TPU_RUNTIME_VERSION='tpu-ubuntu2204-base', **ENV)
    calls = self._calls('gcloud')
    self.assertFalse([c for c in calls if 'versions' in c])
    self.assertIn('--version=tpu-ubuntu2204-base', self._create_call(calls))

  def test_create_refuses_a_network_open_to_the_internet(self):
    open_rule = 'tf-open|default|INGRESS|0.0.0.0/0|tcp:8470-8476|False||'
    # Which rules count (common.sh's open_ingress_rules, on network default).
    for name, rules, network, found in (
        ('the default network\'s own rules', DEFAULT_NETWORK_RULES, 'default',
         ''),
        ('every port', 'all-open|default|INGRESS|0.0.0.0/0|all|False||',
         'default', 'all-open allows all from 0.0.0.0/0'),
        ('TPU runtime ports', open_rule, 'default',
         'tf-open allows tcp:8470-8476 from 0.0.0.0/0'),
        ('SSH and more', 'ssh-web|default|INGRESS|0.0.0.0/0|tcp:22,tcp:80|'
         'False||', 'default', 'ssh-web allows tcp:22,tcp:80 from 0.0.0.0/0'),
        ('IPv6 internet', 'v6|default|INGRESS|10.0.0.0/8,::/0|tcp|False||',
         'default', 'v6 allows tcp from 10.0.0.0/8,::/0'),
        ('disabled', open_rule.replace('|False|', '|True|'), 'default', ''),
        ('tagged VMs only', open_rule + 'web', 'default', ''),
        ('service account only', open_rule + '|sa@p.iam', 'default', ''),
        ('egress', open_rule.replace('INGRESS', 'EGRESS'), 'default', ''),
        ('another network', open_rule, 'private', ''),
        ('an office range', open_rule.replace('0.0.0.0/0', '203.0.113.0/24'),
         'default', '')):
      with self.subTest(name):
        result = self._bash(f'open_ingress_rules {network}', PROJECT='p',
                            FAKE_FIREWALL_RULES=rules)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), found)
    self._calls()
    # create_tpu.sh: refused before creating anything, or created on NETWORK.
    for rules, env, creates in (
        (DEFAULT_NETWORK_RULES, {}, True),
        (DEFAULT_NETWORK_RULES + '\n' + open_rule, {}, False),
        (open_rule, {'NETWORK': 'private'}, True),
        (open_rule, {'ALLOW_OPEN_INGRESS': '1'}, True)):
      with self.subTest(rules=rules, env=env):
        result = self._run('create_tpu.sh', ACCELERATOR_TYPE='v3-8',
                           FAKE_FIREWALL_RULES=rules, **env, **ENV)
        calls = self._calls('gcloud')
        create = self._create_call(calls)
        if creates:
          self.assertEqual(result.returncode, 0, result.stderr)
          self.assertIn(f'--network={env.get("NETWORK", "default")}', create)
        else:
          self.assertEqual(result.returncode, 2)
          self.assertIsNone(create)
          self.assertIn('network default lets the internet reach',
                        result.stderr)
          self.assertIn('tf-open allows tcp:8470-8476 from 0.0.0.0/0',
                        result.stderr)
          self.assertIn('ALLOW_OPEN_INGRESS=1', result.stderr)
        listed = [c for c in calls if 'firewall-rules' in c]
        self.assertLen(listed, 0 if 'ALLOW_OPEN_INGRESS' in env else 1)

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
