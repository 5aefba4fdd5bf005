#!/usr/bin/env bash
# Runs ON THE TPU VM: the venv's Python (setup.sh made it) with the
# environment TensorFlow needs to reach the TPU in MODE, then ARG...:
#   local          a single-host TPU VM (v3-8, v4-8; main.py --tpu=local):
#                  PJRT with the venv's libtpu (NEXT_PLUGGABLE_DEVICE_USE_C_API,
#                  TF_PLUGGABLE_DEVICE_LIBRARY_PATH)
#   pod TPU_NAME   worker 0 of a multi-host slice (main.py --tpu=TPU_NAME):
#                  this process is the one TensorFlow client; it reaches every
#                  host's TPU runtime through the TPU's name, so it must not
#                  open the local chips itself (TPU_LOAD_LIBRARY=0)
#   cpu            no TPU (export, predict): TPU_LOAD_LIBRARY=0, so a
#                  training run that holds the chips is not disturbed
# exec keeps the process id, so SIGTERM sent to it reaches main.py.
# Usage (on the VM, in ~/mpl_tf): tpu_scripts/vm/python.sh MODE [NAME] ARG...
set -euo pipefail

error() {
  echo "error: $(basename "$0"): $*" >&2
  exit 2
}

venv="${MPL_TF_VENV:-${HOME}/mpl_tf_venv}"
python="${venv}/bin/python"
[[ -x "${python}" ]] || error "no ${python}; run tpu_scripts/install.sh first"
(($# >= 1)) || error "usage: $(basename "$0") local|pod TPU_NAME|cpu ARG..."
mode="$1"
shift
case "${mode}" in
  local)
    libtpu="$("${python}" -c 'import importlib.util, os
spec = importlib.util.find_spec("libtpu")
print(os.path.join(spec.submodule_search_locations[0], "libtpu.so") if spec else "")')"
    [[ -n "${libtpu}" && -f "${libtpu}" ]] \
      || error "the venv has no libtpu/libtpu.so; run tpu_scripts/install.sh"
    export NEXT_PLUGGABLE_DEVICE_USE_C_API=true
    export TF_PLUGGABLE_DEVICE_LIBRARY_PATH="${libtpu}"
    ;;
  pod)
    (($# >= 1)) || error "usage: $(basename "$0") pod TPU_NAME ARG..."
    export TPU_NAME="$1"
    export TPU_LOAD_LIBRARY=0
    shift
    ;;
  cpu)
    export TPU_LOAD_LIBRARY=0
    ;;
  *)
    error "mode is local, pod or cpu, not '${mode}'"
    ;;
esac
exec "${python}" "$@"
