#!/usr/bin/env bash
# Evaluates a trained preset on its validation and test splits
# (main.py --mode=eval: the finetuned student if there is one, else the
# best-on-validation EMA student; --checkpoint=... picks another).
# Usage: tpu_scripts/evaluate.sh PRESET [main.py flags...]
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT ZONE TPU_NAME BUCKET

(($# >= 1)) || error "usage: $(basename "$0") PRESET [main.py flags...]"
preset="$1"
shift
remote_preset_main all "${preset}" --mode=eval --strategy=tpu --tpu=local "$@"
