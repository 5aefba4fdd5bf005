#!/usr/bin/env bash
# Copies this working tree (without .git, .venv, data/ and runs/) to every
# worker of the TPU VM (every host of a pod slice: each host's CPU runs its
# share of the input pipeline) and runs tpu_scripts/vm/setup.sh there: a
# Python >= 3.11 venv (~/mpl_tf_venv, made with uv) with requirements.txt,
# whose `tensorflow==X` is replaced by the Cloud TPU build tensorflow-tpu==X.
# Optional: PYTHON_VERSION (default 3.11), LIBTPU_VERSION (pin libtpu).
# Usage: tpu_scripts/install.sh
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT ZONE TPU_NAME

tf_version="$(pinned_tf_version)" || exit 2
setup_env=()
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
echo "installing on every worker: tensorflow-tpu==${tf_version} in place of" \
  "tensorflow==${tf_version}"
tpu_ssh all "rm -rf ${REMOTE_REPO_DIR} && mkdir ${REMOTE_REPO_DIR} \
  && tar -xzf mpl_tf.tar.gz -C ${REMOTE_REPO_DIR} && cd ${REMOTE_REPO_DIR} \
  && $(printf '%q ' env "${setup_env[@]}" bash tpu_scripts/vm/setup.sh)"
