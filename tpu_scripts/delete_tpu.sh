#!/usr/bin/env bash
# Deletes the TPU VM (the bucket and its runs stay).
# Usage: tpu_scripts/delete_tpu.sh
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT ZONE TPU_NAME

gcloud compute tpus tpu-vm delete "${TPU_NAME}" --project="${PROJECT}" \
  --zone="${ZONE}" --quiet
