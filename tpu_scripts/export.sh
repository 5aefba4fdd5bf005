#!/usr/bin/env bash
# Exports a trained preset's student as a SavedModel (main.py --mode=export,
# docs/export.md) to gs://$BUCKET/runs/<preset>/export, on worker 0's CPU.
# Usage: tpu_scripts/export.sh PRESET [main.py flags...]
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT ZONE TPU_NAME BUCKET

(($# >= 1)) || error "usage: $(basename "$0") PRESET [main.py flags...]"
preset="$1"
shift
remote_preset_main 0 "${preset}" --mode=export --strategy=one_device \
  --export_dir="gs://${BUCKET}/runs/${preset}/export" "$@"
