#!/usr/bin/env bash
# Copies this working tree (without .git, .venv, data/ and runs/) to every
# worker of the TPU VM and installs requirements.txt plus the TPU build of
# the same TensorFlow version. Usage: tpu_scripts/install.sh
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT ZONE TPU_NAME

archive="$(mktemp -d)/mpl_tf.tar.gz"
tar -czf "${archive}" -C "${REPO_ROOT}" --exclude=./.git --exclude=./.venv \
  --exclude=./data --exclude=./runs .
gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:mpl_tf.tar.gz" \
  --project="${PROJECT}" --zone="${ZONE}" --worker=all
tf_version="$(sed -n 's/^tensorflow==//p' "${REPO_ROOT}/requirements.txt")"
[[ -n "${tf_version}" ]] || error "requirements.txt pins no tensorflow version"
python="${PYTHON:-python3}"
tpu_ssh all "rm -rf ${REMOTE_REPO_DIR} && mkdir ${REMOTE_REPO_DIR} \
  && tar -xzf mpl_tf.tar.gz -C ${REMOTE_REPO_DIR} && cd ${REMOTE_REPO_DIR} \
  && ${python} -m pip install -r requirements.txt \
  && ${python} -m pip install tensorflow-tpu==${tf_version} \
     -f https://storage.googleapis.com/libtpu-tf-releases/index.html"
