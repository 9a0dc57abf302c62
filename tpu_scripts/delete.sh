#!/usr/bin/env bash
# Delete the slice (and its queued resource, if it was created with --queued).
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/delete.sh --name NAME --zone ZONE [--queued] [--project P] [--dry-run]
USAGE
}

QUEUED=0
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --queued) QUEUED=1; shift ;;
    *) die "unknown flag $1" ;;
  esac
done
require TPU_NAME --name
require TPU_ZONE --zone
where
if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" "${WHERE[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${WHERE[@]}" --quiet
fi
