#!/usr/bin/env bash
# Runs ON EACH TPU VM WORKER (install.sh calls it there, in ~/mpl_tf): makes
# the virtual environment ~/mpl_tf_venv and installs requirements.txt into it
# with the Cloud TPU build of TensorFlow, tensorflow-tpu, in place of the CPU
# wheel `tensorflow` (both own the `tensorflow` Python package, so the CPU
# wheel must not be installed beside it): requirements.txt without its
# `tensorflow==X` line, plus tensorflow-tpu==X, in one pip resolve.
#
# Python: requirements.txt needs Python >= 3.11 (numpy 2.4), and the TPU
# runtime images are Ubuntu 22.04 with Python 3.10. uv (pinned, from PyPI)
# makes the venv: `uv venv --python 3.11` uses a Python 3.11 the image has or
# else fetches a standalone CPython build (docs.astral.sh/uv/guides/
# install-python/). That works the same on every runtime image (tpu-vm-tf-*,
# tpu-ubuntu2204-base, v2-alpha-*) without adding a PPA or waiting on apt
# locks held by a fresh VM's unattended upgrades.
#
# Environment (all optional):
#   PYTHON_VERSION  the venv's Python, default 3.11 (what the tests run on)
#   LIBTPU_VERSION  pin libtpu (default: what tensorflow-tpu asks for)
#   MPL_TF_VENV     the venv's directory, default ~/mpl_tf_venv
#   UV              a uv to use instead of installing the pinned one
# Usage (on the VM): tpu_scripts/vm/setup.sh
set -euo pipefail

error() {
  echo "error: $(basename "$0"): $*" >&2
  exit 2
}

UV_VERSION="0.13.9"
# Google's index of TensorFlow/libtpu builds for Cloud TPU (pip -f), as in
# Google's own install line for tensorflow-tpu.
LIBTPU_TF_INDEX="https://storage.googleapis.com/libtpu-tf-releases/index.html"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${MPL_TF_VENV:-${HOME}/mpl_tf_venv}"
python_version="${PYTHON_VERSION:-3.11}"
[[ "${python_version}" =~ ^3\.[0-9]+$ ]] \
  || error "PYTHON_VERSION must look like 3.11, not '${python_version}'"
tf_version="$(sed -n 's/^tensorflow==//p' "${repo}/requirements.txt")"
[[ -n "${tf_version}" ]] || error "requirements.txt pins no tensorflow version"

# The venv, with the Python asked for (made again if it has another one;
# uv's --clear refuses to empty a directory that is not a venv).
if ! [[ -x "${venv}/bin/python" ]] || ! "${venv}/bin/python" -c \
  "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '${python_version}')"; then
  uv="${UV:-}"
  if [[ -z "${uv}" ]]; then
    # --user: no root needed, nothing of the system Python's is replaced.
    python3 -m pip install --user --quiet "uv==${UV_VERSION}" \
      || python3 -m pip install --user --quiet --break-system-packages \
        "uv==${UV_VERSION}" \
      || error "could not install uv==${UV_VERSION} with python3 -m pip"
    uv="${HOME}/.local/bin/uv"
  fi
  "${uv}" venv --seed --clear --python "${python_version}" "${venv}"
fi

requirements="${venv}/requirements-tpu.txt"
sed '/^tensorflow==/d' "${repo}/requirements.txt" >"${requirements}"
packages=("tensorflow-tpu==${tf_version}")
if [[ -n "${LIBTPU_VERSION:-}" ]]; then
  packages+=("libtpu==${LIBTPU_VERSION}")
fi
"${venv}/bin/python" -m pip install --upgrade --quiet pip
"${venv}/bin/python" -m pip install -r "${requirements}" "${packages[@]}" \
  -f "${LIBTPU_TF_INDEX}"

# Check: tensorflow-tpu at the pinned version, no CPU wheel, libtpu present.
"${venv}/bin/python" - "${tf_version}" <<'EOF'
import importlib.metadata as metadata
import sys

want = sys.argv[1]
def version(name):
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None
problems = []
if version('tensorflow-tpu') != want:
  problems.append(f'tensorflow-tpu is {version("tensorflow-tpu")}, not {want}')
for cpu_wheel in ('tensorflow', 'tensorflow-cpu', 'tf-nightly'):
  if version(cpu_wheel):
    problems.append(f'{cpu_wheel} {version(cpu_wheel)} is installed beside '
                    'tensorflow-tpu; uninstall it')
if not version('libtpu'):
  problems.append('libtpu is not installed')
if problems:
  sys.exit('error: setup.sh: ' + '; '.join(problems))
print(f'python {sys.version.split()[0]}, tensorflow-tpu {want}, '
      f'libtpu {version("libtpu")}, keras {version("keras")}, '
      f'numpy {version("numpy")}')
EOF
"${venv}/bin/python" -m pip freeze >"${venv}/pip-freeze.txt"
echo "installed into ${venv} (pip freeze: ${venv}/pip-freeze.txt)"
