#!/usr/bin/env bash
# Evaluates a trained preset on its validation and test splits
# (main.py --mode=eval: the finetuned student if there is one, else the
# best-on-validation EMA student; --checkpoint=... picks another), on the
# TPU, from worker 0 like train.sh (--tpu=local on one host, --tpu=$TPU_NAME
# on a pod slice). It runs in this SSH session; the TPU must be free (stop a
# training run on it first). RUN_NAME picks the run, as for train.sh.
# Usage: tpu_scripts/evaluate.sh PRESET [main.py flags...]
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT ZONE TPU_NAME BUCKET

(($# >= 1)) || error "usage: $(basename "$0") PRESET [main.py flags...]"
preset="$1"
shift
set_preset_flags "${preset}"
tpu_launch_args
remote_run 0 "${TPU_LAUNCH[@]}" main.py "${PRESET_FLAGS[@]}" --mode=eval \
  --strategy=tpu "${TPU_FLAG}" "$@"
