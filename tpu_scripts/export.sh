#!/usr/bin/env bash
# Exports a trained preset's student as a SavedModel (main.py --mode=export,
# docs/export.md) to gs://$BUCKET/runs/<run>/export/1 (a numbered version
# directory, as TF Serving wants, and where --mode=predict looks by default),
# on worker 0's CPU (TPU_LOAD_LIBRARY=0: the chips are left alone). RUN_NAME
# picks the run, as for train.sh.
# Usage: tpu_scripts/export.sh PRESET [main.py flags...]
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT ZONE TPU_NAME BUCKET

(($# >= 1)) || error "usage: $(basename "$0") PRESET [main.py flags...]"
preset="$1"
shift
set_preset_flags "${preset}"
run="$(run_name "${preset}")" || exit 2
remote_run 0 bash tpu_scripts/vm/python.sh cpu main.py "${PRESET_FLAGS[@]}" \
  --mode=export --strategy=one_device \
  --export_dir="gs://${BUCKET}/runs/${run}/export/1" "$@"
