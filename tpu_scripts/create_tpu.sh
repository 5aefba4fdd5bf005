#!/usr/bin/env bash
# Creates the Cloud TPU VM and, if it does not exist, the GCS bucket (in the
# TPU's region). The runtime image is Google's TensorFlow image for the
# TensorFlow that requirements.txt pins (cloud.google.com/tpu/docs/runtimes,
# tpu-vm-tf-X.Y.Z[-pod][-pjrt]):
#   single host (ACCELERATOR_TYPE v3-8, v4-8, ...):  tpu-vm-tf-X.Y.Z-pjrt
#   pod slice (v3-32, v4-32, ...):                   tpu-vm-tf-X.Y.Z-pod-pjrt
# The -pod image runs the TPU runtime on every host that the TensorFlow
# client on worker 0 connects to. TPU_RUNTIME_VERSION overrides the image;
# list them with: gcloud compute tpus tpu-vm versions list --zone=$ZONE
# Usage: tpu_scripts/create_tpu.sh [extra gcloud flags...]
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT ZONE TPU_NAME ACCELERATOR_TYPE BUCKET

runtime="${TPU_RUNTIME_VERSION:-}"
if [[ -z "${runtime}" ]]; then
  tf_version="$(pinned_tf_version)" || exit 2
  topology="$(tpu_topology "${ACCELERATOR_TYPE}")" || exit 2
  if [[ "${topology}" == pod ]]; then
    runtime="tpu-vm-tf-${tf_version}-pod-pjrt"
  else
    runtime="tpu-vm-tf-${tf_version}-pjrt"
  fi
fi
gcloud compute tpus tpu-vm create "${TPU_NAME}" --project="${PROJECT}" \
  --zone="${ZONE}" --accelerator-type="${ACCELERATOR_TYPE}" \
  --version="${runtime}" "$@"

if ! gsutil ls -b -p "${PROJECT}" "gs://${BUCKET}" >/dev/null 2>&1; then
  gsutil mb -p "${PROJECT}" -l "${ZONE%-*}" "gs://${BUCKET}"
fi
