#!/usr/bin/env bash
# Runs ON THE TPU VM (worker 0): a run that outlives the SSH session which
# started it, logging to a file on the VM.
#   job.sh start RUN [--copy-log-to=gs://...] -- COMMAND...
#       starts COMMAND detached (setsid + nohup, stdin from /dev/null) and
#       returns; its output goes to ~/mpl_tf_runs/RUN/train.log (appended, so
#       a resumed run keeps the earlier log). When COMMAND ends, the log is
#       copied to --copy-log-to, then its exit code goes to exit_code.
#   job.sh stop RUN [--wait=SECONDS]
#       sends SIGTERM to COMMAND (main.py saves a checkpoint within
#       --stop_check_steps steps and exits); waits up to SECONDS for it to end.
#   job.sh status RUN    running (pid) / exited (code) / never started
#   job.sh log RUN [--follow]   the log's last 100 lines (and then follows)
# Run directory: ${MPL_TF_RUNS:-~/mpl_tf_runs}/RUN with train.log, train.pid
# (while running) and exit_code (after). One run per RUN at a time.
set -euo pipefail

error() {
  echo "error: $(basename "$0"): $*" >&2
  exit 2
}

usage="usage: $(basename "$0") start RUN [--copy-log-to=URI] -- COMMAND...
       $(basename "$0") stop RUN [--wait=SECONDS] | status RUN | log RUN [--follow]"
(($# >= 2)) || error "${usage}"
action="$1"
run="$2"
shift 2
[[ "${run}" =~ ^[A-Za-z0-9._-]+$ ]] || error "bad run name '${run}'"
runs="${MPL_TF_RUNS:-${HOME}/mpl_tf_runs}"
run_dir="${runs}/${run}"
log="${run_dir}/train.log"
pid_file="${run_dir}/train.pid"

# running_pid: the run's process id if it is running, else nothing.
running_pid() {
  local pid
  pid="$(cat "${pid_file}" 2>/dev/null)" || return 0
  if [[ "${pid}" =~ ^[0-9]+$ ]] && kill -0 "${pid}" 2>/dev/null; then
    echo "${pid}"
  fi
}

now() { date -u +%Y-%m-%dT%H:%M:%SZ; }

case "${action}" in
  start)
    copy_to=""
    while (($#)) && [[ "$1" != -- ]]; do
      case "$1" in
        --copy-log-to=*) copy_to="${1#--copy-log-to=}" ;;
        *) error "unknown option $1; ${usage}" ;;
      esac
      shift
    done
    if [[ "${1:-}" != -- ]] || (($# < 2)); then
      error "${usage}"
    fi
    shift
    mkdir -p "${run_dir}"
    pid="$(running_pid)"
    [[ -z "${pid}" ]] || error "run ${run} is already running (pid ${pid});" \
      "stop it first (tpu_scripts/stop.sh ${run})"
    rm -f "${pid_file}" "${run_dir}/exit_code"
    # setsid: a session of its own, so the end of the SSH session (SIGHUP to
    # its process group) does not reach it; nohup for good measure.
    setsid nohup bash "${BASH_SOURCE[0]}" _supervise "${run}" "${copy_to}" \
      "$@" >>"${log}" 2>&1 </dev/null &
    for _ in $(seq 50); do
      [[ -s "${pid_file}" ]] && break
      sleep 0.2
    done
    pid="$(running_pid)"
    if [[ -n "${pid}" ]]; then
      echo "started run ${run}: pid ${pid}, log ${log} on $(hostname)"
    elif [[ -f "${run_dir}/exit_code" ]]; then
      tail -n 20 "${log}" >&2
      error "run ${run} exited at once (code $(cat "${run_dir}/exit_code"))"
    else
      echo "run ${run} is starting; log ${log} on $(hostname)"
    fi
    ;;

  _supervise)
    # The detached wrapper: runs COMMAND as its child, records its pid and
    # exit code, forwards SIGTERM/SIGINT to it, copies the log at the end.
    copy_to="$1"
    shift
    echo "[$(now)] job.sh: run ${run} on $(hostname): $*"
    child=""
    trap 'if [[ -n "${child}" ]]; then kill -TERM "${child}" 2>/dev/null || true; fi' TERM INT
    "$@" &
    child=$!
    echo "${child}" >"${pid_file}"
    status=0
    while :; do
      if wait "${child}"; then status=0; else status=$?; fi
      # wait also returns when a trapped signal arrives: go on waiting.
      kill -0 "${child}" 2>/dev/null || break
    done
    echo "[$(now)] job.sh: run ${run} exited with code ${status}"
    if [[ -n "${copy_to}" ]]; then
      gsutil -q cp "${log}" "${copy_to}" \
        || echo "[$(now)] job.sh: could not copy the log to ${copy_to}"
    fi
    # Last, so that exit_code means: ended, log copied.
    echo "${status}" >"${run_dir}/exit_code"
    rm -f "${pid_file}"
    exit "${status}"
    ;;

  stop)
    wait_seconds=0
    for option in "$@"; do
      case "${option}" in
        --wait=*) wait_seconds="${option#--wait=}" ;;
        *) error "unknown option ${option}; ${usage}" ;;
      esac
    done
    [[ "${wait_seconds}" =~ ^[0-9]+$ ]] || error "--wait takes seconds"
    pid="$(running_pid)"
    [[ -n "${pid}" ]] || error "run ${run} is not running on $(hostname)"
    kill -TERM "${pid}"
    echo "sent SIGTERM to run ${run} (pid ${pid}): it saves a checkpoint" \
      "within --stop_check_steps steps and exits"
    for ((waited = 0; waited < wait_seconds; waited++)); do
      [[ -n "$(running_pid)" ]] || break
      sleep 1
    done
    if [[ -z "$(running_pid)" ]]; then
      for _ in $(seq 300); do   # the log's copy to GCS, then exit_code
        [[ -f "${run_dir}/exit_code" ]] && break
        sleep 0.2
      done
      echo "run ${run} exited with code $(cat "${run_dir}/exit_code" \
        2>/dev/null || echo '?')"
    elif ((wait_seconds > 0)); then
      echo "run ${run} is still running after ${wait_seconds} s;" \
        "follow it with tpu_scripts/logs.sh ${run}"
    fi
    ;;

  status)
    pid="$(running_pid)"
    if [[ -n "${pid}" ]]; then
      echo "run ${run}: running, pid ${pid}, log ${log}"
    elif [[ -f "${run_dir}/exit_code" ]]; then
      echo "run ${run}: exited with code $(cat "${run_dir}/exit_code")," \
        "log ${log}"
    else
      echo "run ${run}: not started on $(hostname)"
      exit 1
    fi
    ;;

  log)
    follow=0
    for option in "$@"; do
      case "${option}" in
        --follow) follow=1 ;;
        *) error "unknown option ${option}; ${usage}" ;;
      esac
    done
    [[ -f "${log}" ]] || error "no log ${log} on $(hostname)"
    if ((follow)); then
      exec tail -n 100 -F "${log}"
    fi
    tail -n 100 "${log}"
    ;;

  *)
    error "${usage}"
    ;;
esac
