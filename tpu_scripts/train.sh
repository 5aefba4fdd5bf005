#!/usr/bin/env bash
# Trains a preset on the TPU: flags/<preset>.cfg with --strategy=tpu, data
# from gs://$BUCKET/data/<the preset's data set>, checkpoints and results in
# gs://$BUCKET/runs/<run> (<run> is RUN_NAME, default the preset). Extra
# flags are passed on and win over the preset's.
#
# One TensorFlow client, on worker 0, drives the whole TPU:
#   single host (v3-8, v4-8):    main.py --tpu=local
#   pod slice (v3-32, v4-32...): main.py --tpu=$TPU_NAME, TPU_LOAD_LIBRARY=0;
#                                the other hosts serve it through the TPU
#                                runtime of the -pod runtime image
# The size comes from ACCELERATOR_TYPE, or else from gcloud describe.
#
# The run is detached on the VM (tpu_scripts/vm/job.sh): it survives the end
# of this SSH session and logs to ~/mpl_tf_runs/<run>/train.log on worker 0,
# copied to gs://$BUCKET/runs/<run>/train.log when it ends. Follow it with
# tpu_scripts/logs.sh <run>; stop it with tpu_scripts/stop.sh <run> (SIGTERM:
# it saves a checkpoint and exits). Rerunning resumes from the latest
# checkpoint.
# Usage: tpu_scripts/train.sh PRESET [main.py flags...]
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT ZONE TPU_NAME BUCKET

(($# >= 1)) || error "usage: $(basename "$0") PRESET [main.py flags...]"
preset="$1"
shift
set_preset_flags "${preset}"
run="$(run_name "${preset}")" || exit 2
tpu_launch_args
remote_run 0 bash tpu_scripts/vm/job.sh start "${run}" \
  --copy-log-to="gs://${BUCKET}/runs/${run}/train.log" -- \
  "${TPU_LAUNCH[@]}" main.py "${PRESET_FLAGS[@]}" --strategy=tpu "${TPU_FLAG}" \
  "$@"
echo "follow: tpu_scripts/logs.sh ${run}    stop: tpu_scripts/stop.sh ${run}"
