# shellcheck shell=bash
# Shared by every script in tpu_scripts/ that runs on your machine (sourced,
# not run). The scripts in tpu_scripts/vm/ run on the TPU VM instead.
#
# Names come from the environment, never from the scripts:
#   PROJECT           Google Cloud project id
#   ZONE              zone of the TPU VM (e.g. europe-west4-a)
#   TPU_NAME          name of the TPU VM (a single host or a pod slice)
#   ACCELERATOR_TYPE  e.g. v3-8, v4-32 (create_tpu.sh needs it; train.sh and
#                     evaluate.sh ask gcloud for it when it is not set)
#   BUCKET            GCS bucket name, without gs:// (data and runs)
# Optional: TPU_RUNTIME_VERSION, NETWORK, SUBNETWORK, ALLOW_OPEN_INGRESS
# (create_tpu.sh), RUN_NAME (train, evaluate, export: the run's name, default
# the preset's), PYTHON_VERSION and LIBTPU_VERSION (install.sh).

TPU_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "${TPU_SCRIPTS_DIR}")"
# Where install.sh puts the repository on every worker (relative to the home
# dir); the VM-side scripts are then tpu_scripts/vm/ in it.
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

# pinned_tf_version: the tensorflow version requirements.txt pins.
pinned_tf_version() {
  local version
  version="$(sed -n 's/^tensorflow==//p' "${REPO_ROOT}/requirements.txt")"
  [[ -n "${version}" ]] || error "requirements.txt pins no tensorflow version"
  echo "${version}"
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

# run_name PRESET: the run's name, RUN_NAME or else the preset's. It names
# the run directory gs://$BUCKET/runs/<run> and the VM's ~/mpl_tf_runs/<run>.
run_name() {
  local name="${RUN_NAME:-$1}"
  [[ "${name}" =~ ^[A-Za-z0-9._-]+$ ]] \
    || error "run name '${name}' may only have letters, digits, '.', '_', '-'"
  echo "${name}"
}

# set_preset_flags PRESET: sets PRESET_FLAGS to main.py's flags for PRESET:
# its flagfile, its data in gs://$BUCKET/data/<data set> and its run
# directory gs://$BUCKET/runs/<run>. Flags given after them win.
set_preset_flags() {
  local data_name run
  data_name="$(preset_data_name "$1")" || exit 2
  run="$(run_name "$1")" || exit 2
  # shellcheck disable=SC2034  # read by the scripts that source this file
  PRESET_FLAGS=(--flagfile="flags/$1.cfg"
    --data_dir="gs://${BUCKET}/data/${data_name}"
    --model_dir="gs://${BUCKET}/runs/${run}")
}

# accelerator_type: ACCELERATOR_TYPE, or else the TPU's, asked of gcloud.
accelerator_type() {
  local type="${ACCELERATOR_TYPE:-}"
  if [[ -z "${type}" ]]; then
    type="$(gcloud compute tpus tpu-vm describe "${TPU_NAME}" \
      --project="${PROJECT}" --zone="${ZONE}" \
      --format='value(acceleratorType)')" \
      || error "could not describe TPU ${TPU_NAME}; set ACCELERATOR_TYPE"
  fi
  [[ -n "${type}" ]] || error "TPU ${TPU_NAME} has no acceleratorType;" \
    "set ACCELERATOR_TYPE (e.g. v3-8)"
  echo "${type}"
}

# tpu_topology [TYPE]: 'single' for one host (v2-8, v3-8, v4-8, v5p-8,
# v5litepod-8, v6e-8 and smaller), 'pod' for a multi-host slice (v3-32,
# v4-32, ...). The number after the last '-' is the slice's cores or chips;
# every TPU generation has at most 8 of them on one host.
tpu_topology() {
  local type="${1:-}" size
  if [[ -z "${type}" ]]; then
    type="$(accelerator_type)" || exit 2
  fi
  size="${type##*-}"
  [[ "${type}" == *-* && "${size}" =~ ^[0-9]+$ ]] \
    || error "cannot read the slice size from accelerator type '${type}'"
  if ((size > 8)); then echo pod; else echo single; fi
}

# tpu_generation TYPE: the TPU generation of an accelerator type: v2, v3,
# v4, v5p, v5e (v5litepod-N) or v6e; any other is an error, since Google
# documents TensorFlow runtime images for these only (README.md, "TPU
# software").
tpu_generation() {
  case "$1" in
    v2-*) echo v2 ;;
    v3-*) echo v3 ;;
    v4-*) echo v4 ;;
    v5p-*) echo v5p ;;
    v5litepod-* | v5e-*) echo v5e ;;
    v6e-*) echo v6e ;;
    *) error "no TensorFlow runtime image is documented for accelerator type" \
      "'$1'; these scripts support v2, v3, v4, v5p, v5litepod (v5e) and v6e" ;;
  esac
}

# tf_runtime_candidates TYPE TF: the TensorFlow runtime images (software
# versions for `gcloud compute tpus tpu-vm create --version`) for TensorFlow
# TF on accelerator type TYPE, best first, one a line. Google documents
# tpu-vm-tf-TF[-pod]-pjrt for every generation here (-pod: a multi-host
# slice); the images Google lists for TensorFlow 2.18 add a generation suffix
# (-v5p-and-below for v2 to v5p, -v5e-and-v6 for v5e and v6e), which is
# tried first. create_tpu.sh takes the first one the zone offers.
tf_runtime_candidates() {
  local generation topology pod="" suffix
  generation="$(tpu_generation "$1")" || exit 2
  topology="$(tpu_topology "$1")" || exit 2
  if [[ "${topology}" == pod ]]; then pod="-pod"; fi
  case "${generation}" in
    v5e | v6e) suffix="-v5e-and-v6" ;;
    *) suffix="-v5p-and-below" ;;
  esac
  echo "tpu-vm-tf-$2${pod}-pjrt${suffix}"
  echo "tpu-vm-tf-$2${pod}-pjrt"
}

# base_runtime TYPE: Google's framework-neutral image for the generation of
# TYPE (the runtimes page's PyTorch/JAX table). One host runs from it too:
# vm/setup.sh brings TensorFlow and libtpu in the venv. A pod slice cannot:
# its hosts need the TensorFlow runtime of a tpu-vm-tf-*-pod-* image.
base_runtime() {
  local generation
  generation="$(tpu_generation "$1")" || exit 2
  case "${generation}" in
    v6e) echo v2-alpha-tpuv6e ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v5e) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# open_ingress_rules NETWORK: prints "NAME allows ALLOWED from SOURCES" for
# each enabled ingress rule of NETWORK (in PROJECT) that applies to every VM
# (no target tags or service accounts) and lets the internet (0.0.0.0/0,
# ::/0) reach more than tcp:22 (SSH), tcp:3389 (RDP: the `default` network's
# own rule; nothing listens there on a TPU VM) and ICMP.
open_ingress_rules() {
  local network="$1" rules name rule_network direction sources allowed disabled
  local target_tags target_accounts item open format
  format="value[separator='|'](name,network.basename(),direction,"
  format+="sourceRanges.list(),allowed[].map().firewall_rule().list(),"
  format+="disabled,targetTags.list(),targetServiceAccounts.list())"
  rules="$(gcloud compute firewall-rules list --project="${PROJECT}" \
    --format="${format}")" \
    || error "could not list the firewall rules of project ${PROJECT}" \
      "(gcloud compute firewall-rules list); set ALLOW_OPEN_INGRESS=1 to skip" \
      "this check"
  while IFS='|' read -r name rule_network direction sources allowed \
    disabled target_tags target_accounts; do
    [[ -n "${name}" && "${rule_network}" == "${network}" ]] || continue
    [[ "${direction}" == INGRESS && "${disabled,,}" != true ]] || continue
    [[ -z "${target_tags}${target_accounts}" ]] || continue
    [[ ",${sources}," == *,0.0.0.0/0,* || ",${sources}," == *,::/0,* ]] \
      || continue
    open=""
    for item in ${allowed//,/ }; do
      case "${item}" in
        tcp:22 | tcp:3389 | icmp) ;;
        *) open=1 ;;
      esac
    done
    if [[ -n "${open}" ]]; then
      echo "${name} allows ${allowed} from ${sources}"
    fi
  done <<<"${rules}"
}

# tpu_ssh WORKER COMMAND: runs COMMAND on the TPU VM's worker(s) ('all' or 0).
tpu_ssh() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --project="${PROJECT}" \
    --zone="${ZONE}" --worker="$1" --command="$2"
}

# remote_run WORKER ARG...: runs ARG... (each quoted) in the VM's copy of the
# repository, e.g. remote_run 0 bash tpu_scripts/vm/python.sh cpu main.py ...
remote_run() {
  local worker="$1"
  shift
  tpu_ssh "${worker}" "cd ${REMOTE_REPO_DIR} && $(printf '%q ' "$@")"
}

# tpu_launch_args: sets TPU_LAUNCH to the VM-side launcher for this TPU
# (bash tpu_scripts/vm/python.sh with its mode) and TPU_FLAG to main.py's --tpu:
#   one host:  python.sh local          --tpu=local
#   pod slice: python.sh pod TPU_NAME   --tpu=TPU_NAME
# On a pod slice one TensorFlow client, on worker 0, drives every host
# through the TPU name (see README.md).
tpu_launch_args() {
  local topology
  topology="$(tpu_topology "")" || exit 2
  # shellcheck disable=SC2034  # TPU_LAUNCH and TPU_FLAG: for the callers
  if [[ "${topology}" == pod ]]; then
    TPU_LAUNCH=(bash tpu_scripts/vm/python.sh pod "${TPU_NAME}")
    TPU_FLAG="--tpu=${TPU_NAME}"
  else
    TPU_LAUNCH=(bash tpu_scripts/vm/python.sh local)
    TPU_FLAG="--tpu=local"
  fi
}
