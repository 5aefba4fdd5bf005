#!/usr/bin/env bash
# Copies this working tree (without .git, .venv, data/ and runs/) to every
# worker of the TPU VM (every host of a pod slice) and runs
# tpu_scripts/vm/setup.sh there: a Python >= 3.11 venv (~/mpl_tf_venv, made
# with uv) with requirements.txt, whose `tensorflow==X` is replaced by the
# Cloud TPU build tensorflow-tpu==X, and libtpu pinned to the build paired
# with it. Every worker gets the same tree, hence the same pins, and checks
# itself (vm/check_versions.py) against them, against the TPU's runtime
# image and, on a pod slice, against the TensorFlow its TPU runtime serves:
# a worker that disagrees stops the install with what it found, what was
# expected and what to do.
# Optional: PYTHON_VERSION (default 3.11), LIBTPU_VERSION (another libtpu).
# Usage: tpu_scripts/install.sh
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT ZONE TPU_NAME

tf_version="$(pinned_tf_version)" || exit 2
# What the TPU is and which image it runs, for the workers' check.
description="$(gcloud compute tpus tpu-vm describe "${TPU_NAME}" \
  --project="${PROJECT}" --zone="${ZONE}" \
  --format='value(acceleratorType,runtimeVersion)')" \
  || error "could not describe TPU ${TPU_NAME} in ${ZONE}"
read -r accelerator runtime <<<"${description}"
[[ -n "${accelerator}" && -n "${runtime:-}" ]] \
  || error "TPU ${TPU_NAME} reports no acceleratorType or runtimeVersion"
setup_env=("ACCELERATOR_TYPE=${accelerator}" "TPU_RUNTIME_VERSION=${runtime}")
for name in PYTHON_VERSION LIBTPU_VERSION; do
  if [[ -n "${!name:-}" ]]; then
    setup_env+=("${name}=${!name}")
  fi
done

archive="$(mktemp -d)/mpl_tf.tar.gz"
tar -czf "${archive}" -C "${REPO_ROOT}" --exclude=./.git --exclude=./.venv \
  --exclude=./data --exclude=./runs .
gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:mpl_tf.tar.gz" \
  --project="${PROJECT}" --zone="${ZONE}" --worker=all
echo "installing on every worker of ${TPU_NAME} (${accelerator}, image" \
  "${runtime}): tensorflow-tpu==${tf_version} in place of" \
  "tensorflow==${tf_version}"
tpu_ssh all "rm -rf ${REMOTE_REPO_DIR} && mkdir ${REMOTE_REPO_DIR} \
  && tar -xzf mpl_tf.tar.gz -C ${REMOTE_REPO_DIR} && cd ${REMOTE_REPO_DIR} \
  && $(printf '%q ' env "${setup_env[@]}" bash tpu_scripts/vm/setup.sh)"
