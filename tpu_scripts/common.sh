# shellcheck shell=bash
# Shared by every script in tpu_scripts/ (sourced, not run).
#
# Names come from the environment, never from the scripts:
#   PROJECT           Google Cloud project id
#   ZONE              zone of the TPU VM (e.g. europe-west4-a)
#   TPU_NAME          name of the TPU VM
#   ACCELERATOR_TYPE  e.g. v3-8 (create_tpu.sh only)
#   BUCKET            GCS bucket name, without gs:// (data and runs)
# Optional: TPU_RUNTIME_VERSION (create_tpu.sh), PYTHON (the VM's python).

TPU_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "${TPU_SCRIPTS_DIR}")"
# Where install.sh puts the repository on the VM (relative to the home dir).
REMOTE_REPO_DIR="mpl_tf"

error() {
  echo "error: $(basename "$0"): $*" >&2
  exit 2
}

# require_env NAME...: stops with one message naming every missing variable.
require_env() {
  local missing=()
  local name
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      missing+=("${name}")
    fi
  done
  if ((${#missing[@]})); then
    echo "error: $(basename "$0") needs these environment variables:" \
      "${missing[*]}" >&2
    echo "  e.g.: export PROJECT=my-project ZONE=europe-west4-a" \
      "TPU_NAME=mpl-v3 ACCELERATOR_TYPE=v3-8 BUCKET=my-bucket" >&2
    echo "  (see tpu_scripts/README.md)" >&2
    exit 2
  fi
}

# preset_flagfile PRESET: the preset's path in the repository, checked.
preset_flagfile() {
  local flagfile="${REPO_ROOT}/flags/$1.cfg"
  if [[ ! -f "${flagfile}" ]]; then
    local presets=() path
    for path in "${REPO_ROOT}"/flags/*.cfg; do
      presets+=("$(basename "${path}" .cfg)")
    done
    error "no preset flags/$1.cfg; presets: ${presets[*]}"
  fi
  echo "${flagfile}"
}

# preset_data_name PRESET: the last component of the preset's --data_dir,
# which is also the data set's name under gs://$BUCKET/data/.
preset_data_name() {
  local flagfile data_dir
  flagfile="$(preset_flagfile "$1")" || exit 2
  data_dir="$(sed -n 's/^--data_dir=//p' "${flagfile}" | tail -n 1)"
  [[ -n "${data_dir}" ]] || error "flags/$1.cfg has no --data_dir"
  basename "${data_dir}"
}

# tpu_ssh WORKER COMMAND: runs COMMAND on the TPU VM's worker(s) ('all' or 0).
tpu_ssh() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --project="${PROJECT}" \
    --zone="${ZONE}" --worker="$1" --command="$2"
}

# remote_main WORKER ARG...: runs main.py in the VM's copy of the repository.
remote_main() {
  local worker="$1"
  shift
  local quoted
  quoted="$(printf '%q ' "$@")"
  tpu_ssh "${worker}" "cd ${REMOTE_REPO_DIR} && ${PYTHON:-python3} main.py ${quoted}"
}

# remote_preset_main WORKER PRESET ARG...: main.py on the VM with PRESET's
# flagfile, its data in gs://$BUCKET/data/<data set> and its run directory
# gs://$BUCKET/runs/PRESET, then ARG... (later flags win over the preset's).
remote_preset_main() {
  local worker="$1" preset="$2" data_name
  shift 2
  data_name="$(preset_data_name "${preset}")" || exit 2
  remote_main "${worker}" --flagfile="flags/${preset}.cfg" \
    --data_dir="gs://${BUCKET}/data/${data_name}" \
    --model_dir="gs://${BUCKET}/runs/${preset}" "$@"
}
