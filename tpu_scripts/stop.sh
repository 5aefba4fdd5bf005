#!/usr/bin/env bash
# Stops a training run cleanly: SIGTERM to main.py on worker 0, which saves a
# checkpoint within --stop_check_steps steps and exits (train.sh resumes
# from it). Waits up to STOP_WAIT seconds (default 600) for it to end.
# Usage: tpu_scripts/stop.sh RUN      (RUN: the preset, or the RUN_NAME used)
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT ZONE TPU_NAME

(($# == 1)) || error "usage: $(basename "$0") RUN"
run="$(RUN_NAME="" run_name "$1")" || exit 2
wait_seconds="${STOP_WAIT:-600}"
[[ "${wait_seconds}" =~ ^[0-9]+$ ]] || error "STOP_WAIT is seconds"
remote_run 0 bash tpu_scripts/vm/job.sh stop "${run}" --wait="${wait_seconds}"
