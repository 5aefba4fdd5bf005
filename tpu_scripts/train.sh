#!/usr/bin/env bash
# Trains a preset on the TPU VM: flags/<preset>.cfg with --strategy=tpu,
# data from gs://$BUCKET/data/<the preset's data set>, checkpoints and
# results in gs://$BUCKET/runs/<preset>. Extra flags are passed on and win
# over the preset's. Rerunning resumes from the latest checkpoint.
# Usage: tpu_scripts/train.sh PRESET [main.py flags...]
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT ZONE TPU_NAME BUCKET

(($# >= 1)) || error "usage: $(basename "$0") PRESET [main.py flags...]"
preset="$1"
shift
remote_preset_main all "${preset}" --strategy=tpu --tpu=local "$@"
