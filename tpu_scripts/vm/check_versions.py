"""Checks, on a TPU VM worker, that the TPU software agrees with this checkout.

vm/setup.sh runs it with the venv's python (so it reads the venv's packages)
on every worker, once before the pip install (--skip-packages: the image and
the host's runtime, so a wrong image stops before minutes of installing) and
once after. It checks:

* the venv: tensorflow-tpu at the TensorFlow version requirements.txt pins,
  libtpu at the build paired with it, and no CPU wheel of TensorFlow beside
  tensorflow-tpu (both own the `tensorflow` package);
* the runtime image (`gcloud ... describe`'s runtimeVersion, passed by
  install.sh): a tpu-vm-tf-* image must be of that TensorFlow, -pjrt (the
  scripts drive the TPU through PJRT), -pod exactly when the slice is
  multi-host, and of the generation's suffix if it has one; on one host
  Google's framework-neutral images (tpu-ubuntu2204-base, v2-alpha-*) are
  fine too, since the venv brings TensorFlow and libtpu;
* on a multi-host slice, the TensorFlow this host's TPU runtime serves to the
  client on worker 0: the tag of TF_DOCKER_URL (gcr.io/.../grpc_tpu_worker:
  tf-X.Y.Z-pjrt) in /etc/systemd/system/tpu-runtime.service. TensorFlow
  supports a TPU only when the client and the TPU run the same version.

Every disagreement is one line saying what was found, what was expected and
what to do; the exit code is then 2. The check needs only the standard
library, so it also runs before anything is installed.
"""

import argparse
import importlib.metadata as metadata
import re
import socket
import sys

CPU_WHEELS = ('tensorflow', 'tensorflow-cpu', 'tf-nightly')
RUNTIME_SERVICE = '/etc/systemd/system/tpu-runtime.service'
# Google's framework-neutral images (cloud.google.com/tpu/docs/runtimes).
BASE_IMAGES = ('tpu-ubuntu2204-base', 'v2-alpha-tpuv6e', 'v2-alpha-tpuv5',
               'v2-alpha-tpuv5-lite')
GENERATION_SUFFIXES = {'v5p-and-below': ('v2', 'v3', 'v4', 'v5p'),
                       'v5e-and-v6': ('v5e', 'v6e')}
TF_IMAGE = re.compile(r'^tpu-vm-tf-(?P<tf>\d+\.\d+\.\d+)(?P<pod>-pod)?'
                      r'(?:-(?P<api>pjrt|se))?(?:-(?P<suffix>.+))?$')
DOCKER_URL = re.compile(r'TF_DOCKER_URL=(?P<url>[^"\s]+)')


def generation(accelerator_type):
  """v2, v3, v4, v5p, v5e or v6e, from an accelerator type such as v4-32."""
  prefix = accelerator_type.rsplit('-', 1)[0]
  return {'v5litepod': 'v5e'}.get(prefix, prefix)


def is_multi_host(accelerator_type):
  """Whether the slice has more than one host (above 8 cores or chips)."""
  return int(accelerator_type.rsplit('-', 1)[1]) > 8


def expected_images(tf_version, accelerator_type):
  """The image names create_tpu.sh would pick from (common.sh's candidates)."""
  pod = '-pod' if is_multi_host(accelerator_type) else ''
  suffix = ('-v5e-and-v6' if generation(accelerator_type) in ('v5e', 'v6e')
            else '-v5p-and-below')
  return (f'tpu-vm-tf-{tf_version}{pod}-pjrt{suffix}',
          f'tpu-vm-tf-{tf_version}{pod}-pjrt')


def served_tensorflow(service_text):
  """(TF_DOCKER_URL, its TensorFlow version or None) in a runtime unit file."""
  match = DOCKER_URL.search(service_text)
  if not match:
    return None, None
  version = re.search(r':tf-(\d+\.\d+\.\d+)(?:-|$)', match.group('url'))
  return match.group('url'), version.group(1) if version else None


def package_problems(found, tf_version, libtpu_version):
  """Disagreements of the venv's packages (name -> version or None)."""
  problems = []
  if found.get('tensorflow-tpu') != tf_version:
    problems.append(
        f'tensorflow-tpu: found {found.get("tensorflow-tpu") or "none"}, '
        f'expected {tf_version} (requirements.txt pins tensorflow=='
        f'{tf_version}); rerun tpu_scripts/install.sh')
  for wheel in CPU_WHEELS:
    if found.get(wheel):
      problems.append(
          f'{wheel} {found[wheel]} is installed beside tensorflow-tpu (both '
          f'own the tensorflow package); expected none: pip uninstall {wheel}'
          ', then rerun tpu_scripts/install.sh')
  if found.get('libtpu') != libtpu_version:
    problems.append(
        f'libtpu: found {found.get("libtpu") or "none"}, expected '
        f'{libtpu_version} (the build paired with tensorflow-tpu '
        f'{tf_version}, or LIBTPU_VERSION); rerun tpu_scripts/install.sh')
  return problems


def image_problems(image, accelerator_type, tf_version, service_text):
  """Disagreements of the runtime image and this host's TPU runtime.

  service_text is the runtime unit file's text, or None if it is missing.
  """
  if not image or not accelerator_type:
    return []
  multi_host = is_multi_host(accelerator_type)
  wanted = ' or '.join(expected_images(tf_version, accelerator_type))
  problems = []
  match = TF_IMAGE.match(image)
  if match:
    if match.group('tf') != tf_version:
      problems.append(
          f'runtime image: found {image} (TensorFlow {match.group("tf")}), '
          f'expected {wanted} (TensorFlow {tf_version}, requirements.txt); '
          'recreate the TPU with tpu_scripts/create_tpu.sh, which picks it')
    if match.group('api') != 'pjrt':
      problems.append(
          f'runtime image: found {image}, expected a -pjrt image ({wanted}): '
          'the scripts drive the TPU through PJRT; recreate the TPU')
    if bool(match.group('pod')) != multi_host:
      problems.append(
          f'runtime image: found {image} on {accelerator_type}, expected '
          f'{wanted}: -pod is for multi-host slices only; recreate the TPU')
    owners = GENERATION_SUFFIXES.get(match.group('suffix') or '')
    if owners and generation(accelerator_type) not in owners:
      problems.append(
          f'runtime image: found {image}, made for {", ".join(owners)}, on '
          f'{accelerator_type}; expected {wanted}; recreate the TPU')
  elif image not in BASE_IMAGES:
    problems.append(
        f'runtime image: found {image}, expected {wanted} (or, on one host, '
        f'one of {", ".join(BASE_IMAGES)}); recreate the TPU with '
        'tpu_scripts/create_tpu.sh')
  if not multi_host:
    return problems
  # A pod slice: the client on worker 0 runs tensorflow-tpu from the venv;
  # this host serves it from the TPU runtime its image started.
  if service_text is None:
    problems.append(
        f'TPU runtime: found no {RUNTIME_SERVICE} on this host of a '
        f'multi-host slice, expected one serving TensorFlow {tf_version} to '
        f'the client on worker 0; recreate the TPU with the -pod image '
        f'{wanted}')
    return problems
  url, served = served_tensorflow(service_text)
  if served != tf_version:
    problems.append(
        f'TPU runtime: this host serves TensorFlow {served or "unknown"} '
        f'(TF_DOCKER_URL={url or "not set"} in {RUNTIME_SERVICE}), expected '
        f'{tf_version}, the client\'s (TensorFlow supports a TPU only at the '
        'same version on both sides); recreate the TPU with the -pod image '
        f'{wanted}. Not documented for users, but what Google\'s own '
        'TensorFlow release tests do on every worker: set TF_DOCKER_URL=gcr.io'
        f'/cloud-tpu-v2-images/grpc_tpu_worker:tf-{tf_version}-pjrt in that '
        'file, then sudo systemctl daemon-reload && sudo systemctl restart '
        'tpu-runtime')
  return problems


def installed(names):
  """name -> installed version or None, as the running python sees them."""
  versions = {}
  for name in names:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tensorflow', required=True)
  parser.add_argument('--libtpu', required=True)
  parser.add_argument('--accelerator-type', default='')
  parser.add_argument('--runtime-version', default='')
  parser.add_argument('--runtime-service', default=RUNTIME_SERVICE)
  parser.add_argument('--skip-packages', action='store_true')
  args = parser.parse_args(argv)
  if args.accelerator_type and not re.match(r'^v\w+-\d+$',
                                            args.accelerator_type):
    print(f'error: check_versions: accelerator type {args.accelerator_type!r}'
          ' is not like v4-32', file=sys.stderr)
    return 2
  try:
    with open(args.runtime_service) as f:
      service_text = f.read()
  except OSError:
    service_text = None
  found = installed(('tensorflow-tpu', 'libtpu', 'keras', 'numpy')
                    + CPU_WHEELS)
  problems = image_problems(args.runtime_version, args.accelerator_type,
                            args.tensorflow, service_text)
  if not args.skip_packages:
    problems += package_problems(found, args.tensorflow, args.libtpu)
  if problems:
    print(f'error: check_versions: the TPU software of host '
          f'{socket.gethostname()} does not agree with this checkout:',
          file=sys.stderr)
    for problem in problems:
      print(f'  {problem}', file=sys.stderr)
    return 2
  image = (f'image {args.runtime_version} on {args.accelerator_type}'
           if args.runtime_version and args.accelerator_type
           else 'image not checked (no TPU_RUNTIME_VERSION/ACCELERATOR_TYPE)')
  if args.skip_packages:
    print(f'check_versions: {image}: agrees with TensorFlow {args.tensorflow}')
  else:
    print(f'python {sys.version.split()[0]}, tensorflow-tpu '
          f'{found["tensorflow-tpu"]}, libtpu {found["libtpu"]}, keras '
          f'{found["keras"]}, numpy {found["numpy"]}; {image}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
