#!/usr/bin/env bash
# Creates the Cloud TPU VM and, if it does not exist, the GCS bucket (in the
# TPU's region).
#
# Runtime image (--version): the TensorFlow image for the TensorFlow that
# requirements.txt pins, for the TPU's generation and size (README.md, "TPU
# software"): the first of common.sh's tf_runtime_candidates that
# `gcloud compute tpus tpu-vm versions list` offers in ZONE, e.g.
#   v3-8, v4-8, v5p-8:   tpu-vm-tf-X.Y.Z-pjrt-v5p-and-below, else
#                        tpu-vm-tf-X.Y.Z-pjrt
#   v5litepod-8, v6e-8:  tpu-vm-tf-X.Y.Z-pjrt-v5e-and-v6, else
#                        tpu-vm-tf-X.Y.Z-pjrt
#   pod slices (v4-32, v6e-16...): the same with -pod after X.Y.Z
# If the zone offers none: one host gets Google's framework-neutral image
# for its generation (tpu-ubuntu2204-base, v2-alpha-tpuv5, ...), since the
# venv brings TensorFlow and libtpu; a pod slice is refused, since every
# host must serve the client's TensorFlow. TPU_RUNTIME_VERSION overrides.
#
# Network: TensorFlow's and the TPU runtime's gRPC servers accept
# unauthenticated requests on every interface, so the TPU goes on a network
# (NETWORK, default `default`; SUBNETWORK optional) that no firewall rule
# opens to the internet beyond SSH: the script stops, before creating
# anything, if an enabled ingress rule of that network lets 0.0.0.0/0 (or
# ::/0) reach any port on every VM other than tcp:22 (SSH) and tcp:3389
# (RDP, opened by the `default` network's own rules; nothing listens there on
# a TPU VM), ICMP aside. Set ALLOW_OPEN_INGRESS=1 to create anyway.
# Usage: tpu_scripts/create_tpu.sh [extra gcloud flags...]
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT ZONE TPU_NAME ACCELERATOR_TYPE BUCKET

network="${NETWORK:-default}"

if [[ "${ALLOW_OPEN_INGRESS:-}" != 1 ]]; then
  open_rules="$(open_ingress_rules "${network}")"
  if [[ -n "${open_rules}" ]]; then
    {
      echo "error: $(basename "$0"): network ${network} lets the internet" \
        "reach the TPU VMs' TensorFlow/TPU runtime gRPC ports, which accept" \
        "unauthenticated requests:"
      echo "  ${open_rules//$'\n'/$'\n'  }"
      echo "  fix: narrow these rules' --source-ranges (gcloud compute" \
        "firewall-rules update NAME --source-ranges=...), delete them, or" \
        "set NETWORK to a network without them; ALLOW_OPEN_INGRESS=1" \
        "creates the TPU anyway (see tpu_scripts/README.md, \"Network\")"
    } >&2
    exit 2
  fi
fi

runtime="${TPU_RUNTIME_VERSION:-}"
if [[ -z "${runtime}" ]]; then
  tf_version="$(pinned_tf_version)" || exit 2
  topology="$(tpu_topology "${ACCELERATOR_TYPE}")" || exit 2
  candidates="$(tf_runtime_candidates "${ACCELERATOR_TYPE}" "${tf_version}")" \
    || exit 2
  offered="$(gcloud compute tpus tpu-vm versions list --project="${PROJECT}" \
    --zone="${ZONE}" --format='value(version)')" \
    || error "could not list the TPU software versions of zone ${ZONE}"
  while read -r candidate; do
    if grep -qxF "${candidate}" <<<"${offered}"; then
      runtime="${candidate}"
      break
    fi
  done <<<"${candidates}"
  if [[ -z "${runtime}" && "${topology}" == single ]]; then
    runtime="$(base_runtime "${ACCELERATOR_TYPE}")" || exit 2
    echo "zone ${ZONE} offers no TensorFlow ${tf_version} image for" \
      "${ACCELERATOR_TYPE} (tried: $(echo "${candidates}" | paste -sd' ')):" \
      "using ${runtime}; the venv brings tensorflow-tpu and libtpu"
  elif [[ -z "${runtime}" ]]; then
    tf_images="$(grep '^tpu-vm-tf-' <<<"${offered}" | paste -sd' ')"
    error "zone ${ZONE} offers no TensorFlow ${tf_version} pod image for" \
      "${ACCELERATOR_TYPE} (tried: $(echo "${candidates}" | paste -sd' '));" \
      "every host of a pod slice serves the client's TensorFlow from its" \
      "image, so it must be ${tf_version}. TensorFlow images in ${ZONE}:" \
      "${tf_images:-none}. Pick another ZONE, or pass TPU_RUNTIME_VERSION" \
      "(then tpu_scripts/install.sh checks every host's runtime)"
  fi
fi
echo "runtime image: ${runtime}"
gcloud compute tpus tpu-vm create "${TPU_NAME}" --project="${PROJECT}" \
  --zone="${ZONE}" --accelerator-type="${ACCELERATOR_TYPE}" \
  --version="${runtime}" --network="${network}" \
  ${SUBNETWORK:+"--subnetwork=${SUBNETWORK}"} "$@"

if ! gsutil ls -b -p "${PROJECT}" "gs://${BUCKET}" >/dev/null 2>&1; then
  gsutil mb -p "${PROJECT}" -l "${ZONE%-*}" "gs://${BUCKET}"
fi
