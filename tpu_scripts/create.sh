#!/usr/bin/env bash
# Create a TPU VM slice, directly or as a queued resource (waits for capacity).
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/create.sh --name NAME --zone ZONE [--type v4-32] [--runtime VERSION]
                             [--queued] [--spot] [--project P] [--dry-run]

  --type      accelerator type: v4-8, v4-32, v5litepod-8, v5litepod-32, ... (default v4-8)
  --runtime   TPU VM software version (default tpu-ubuntu2204-base)
  --queued    ask through a queued resource (named NAME-qr), which waits until capacity frees
  --spot      spot / preemptible capacity (pair with tpu_scripts/watch.sh to resume after preemption)
  --dry-run   print the gcloud command instead of running it
USAGE
}

QUEUED=0
SPOT=0
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) TPU_TYPE="$2"; shift 2 ;;
    --runtime) TPU_RUNTIME="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    *) die "unknown flag $1" ;;
  esac
done
require TPU_NAME --name
require TPU_ZONE --zone
where
extra=()
if [[ "$SPOT" == 1 ]]; then
  extra+=(--spot)
fi
if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources create "${TPU_NAME}-qr" --node-id="$TPU_NAME" "${WHERE[@]}" \
    --accelerator-type="$TPU_TYPE" --runtime-version="$TPU_RUNTIME" "${extra[@]+"${extra[@]}"}"
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${WHERE[@]}" \
    --accelerator-type="$TPU_TYPE" --version="$TPU_RUNTIME" "${extra[@]+"${extra[@]}"}"
fi
