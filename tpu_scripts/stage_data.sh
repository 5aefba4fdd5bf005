#!/usr/bin/env bash
# Mirrors a prepared data set (a directory with manifest.json, made by
# `python prepare.py`, docs/data.md) to gs://$BUCKET/data/<name>,
# where <name> is the directory's last component, the name the presets'
# --data_dir ends with. Usage: tpu_scripts/stage_data.sh data/cifar10_4k
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env PROJECT BUCKET

(($# == 1)) || error "usage: $(basename "$0") PREPARED_DATA_DIR"
data_dir="${1%/}"
[[ -f "${data_dir}/manifest.json" ]] || error "${data_dir} has no" \
  "manifest.json; prepare it first (docs/data.md)"
target="gs://${BUCKET}/data/$(basename "${data_dir}")"
# manifest.json marks a complete data set (readers trust nothing else), and
# a bucket has no atomic rename: take the old marker away first, copy the
# shards, and copy the manifest last.
# (rm fails when there is no old manifest: nothing to take away then.)
# The copy is a mirror: rsync -d deletes what the source lacks (shards of
# an earlier preparation with another --shard_size, which readers would
# otherwise name in a warning at every start); -x keeps the manifest out of
# both the copy and the deletion. The target is this data set's own folder.
gsutil -q rm "${target}/manifest.json" 2>/dev/null || true
gsutil -m rsync -r -d -x '^manifest\.json$' "${data_dir}" "${target}"
gsutil cp "${data_dir}/manifest.json" "${target}/manifest.json"
