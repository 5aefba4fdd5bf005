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
# libtpu is pinned to the build paired with the pinned tensorflow-tpu
# (LIBTPU_FOR_TENSORFLOW below; README.md, "TPU software", says how it was
# chosen): tensorflow-tpu 2.20.0 itself asks only for libtpu~=0.0.14, which
# pip would resolve to the newest 0.0.x, a build never released with it.
#
# Then tpu_scripts/vm/check_versions.py checks that the venv, the TPU's
# runtime image and (on a pod slice) this host's TPU runtime agree, and stops
# the install with what it found, what it expected and what to do if not.
#
# Environment (all optional; install.sh passes the first two):
#   ACCELERATOR_TYPE     the TPU's type (v3-8, v4-32...), for the check
#   TPU_RUNTIME_VERSION  the TPU's runtime image, for the check
#   PYTHON_VERSION  the venv's Python, default 3.11 (what the tests run on)
#   LIBTPU_VERSION  another libtpu than the paired one
#   TPU_RUNTIME_SERVICE  the TPU runtime's systemd unit, default
#                   /etc/systemd/system/tpu-runtime.service (checked on pods)
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
# The libtpu build released with each tensorflow-tpu this repository pins.
case "${tf_version}" in
  2.20.0) LIBTPU_FOR_TENSORFLOW="0.0.14" ;;
  *) LIBTPU_FOR_TENSORFLOW="" ;;
esac
libtpu_version="${LIBTPU_VERSION:-${LIBTPU_FOR_TENSORFLOW}}"
[[ -n "${libtpu_version}" ]] || error "no libtpu is paired with" \
  "tensorflow-tpu ${tf_version} (requirements.txt's pin) in" \
  "LIBTPU_FOR_TENSORFLOW; add the pair as tpu_scripts/README.md (\"TPU" \
  "software\") says, or set LIBTPU_VERSION"

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

# The image and this host's TPU runtime first: a wrong one stops here,
# before minutes of installing (the check needs only the standard library).
check=("${venv}/bin/python" - --tensorflow="${tf_version}"
  --libtpu="${libtpu_version}" --accelerator-type="${ACCELERATOR_TYPE:-}"
  --runtime-version="${TPU_RUNTIME_VERSION:-}"
  --runtime-service="${TPU_RUNTIME_SERVICE:-/etc/systemd/system/tpu-runtime.service}")
"${check[@]}" --skip-packages <"${repo}/tpu_scripts/vm/check_versions.py"

requirements="${venv}/requirements-tpu.txt"
sed '/^tensorflow==/d' "${repo}/requirements.txt" >"${requirements}"
packages=("tensorflow-tpu==${tf_version}" "libtpu==${libtpu_version}")
"${venv}/bin/python" -m pip install --upgrade --quiet pip
"${venv}/bin/python" -m pip install -r "${requirements}" "${packages[@]}" \
  -f "${LIBTPU_TF_INDEX}"

# Then all of it with the installed packages (stdin: the venv's python reads
# the script, so it sees the venv's packages).
"${check[@]}" <"${repo}/tpu_scripts/vm/check_versions.py"
"${venv}/bin/python" -m pip freeze >"${venv}/pip-freeze.txt"
echo "installed into ${venv} (pip freeze: ${venv}/pip-freeze.txt)"
