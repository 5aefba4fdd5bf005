#!/usr/bin/env bash
# Shows a run's state and its log on worker 0 (~/mpl_tf_runs/RUN/train.log),
# then follows the log (Ctrl-C stops following, not the run). With
# --no-follow: the last 100 lines only.
# Usage: tpu_scripts/logs.sh RUN [--no-follow]  (RUN: the preset or RUN_NAME)
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT ZONE TPU_NAME

(($# >= 1 && $# <= 2)) || error "usage: $(basename "$0") RUN [--no-follow]"
run="$(RUN_NAME="" run_name "$1")" || exit 2
follow=(--follow)
if (($# == 2)); then
  [[ "$2" == --no-follow ]] || error "usage: $(basename "$0") RUN [--no-follow]"
  follow=()
fi
tpu_ssh 0 "cd ${REMOTE_REPO_DIR} && { bash tpu_scripts/vm/job.sh status ${run}; \
  $(printf '%q ' bash tpu_scripts/vm/job.sh log "${run}" "${follow[@]}"); }"
