#!/usr/bin/env bash
# Creates the Cloud TPU VM and, if it does not exist, the GCS bucket (in the
# TPU's region). Usage: tpu_scripts/create_tpu.sh [extra gcloud flags...]
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT ZONE TPU_NAME ACCELERATOR_TYPE BUCKET

gcloud compute tpus tpu-vm create "${TPU_NAME}" --project="${PROJECT}" \
  --zone="${ZONE}" --accelerator-type="${ACCELERATOR_TYPE}" \
  --version="${TPU_RUNTIME_VERSION:-tpu-ubuntu2204-base}" "$@"

if ! gsutil ls -b -p "${PROJECT}" "gs://${BUCKET}" >/dev/null 2>&1; then
  gsutil mb -p "${PROJECT}" -l "${ZONE%-*}" "gs://${BUCKET}"
fi
