#!/usr/bin/env bash
# Follow a run's log on one worker (process 0 by default: it prints the progress bar and tables).
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/logs.sh --name NAME --zone ZONE --run RUN [--worker 0] [--lines 100] [--project P] [--dry-run]
USAGE
}

RUN_NAME=""
WORKER=0
LINES=100
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run) RUN_NAME="$2"; shift 2 ;;
    --worker) WORKER="$2"; shift 2 ;;
    --lines) LINES="$2"; shift 2 ;;
    *) die "unknown flag $1" ;;
  esac
done
require TPU_NAME --name
require TPU_ZONE --zone
require RUN_NAME --run
where
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker="$WORKER" \
  --command="tail -n $LINES -F \$HOME/sail-runs/$RUN_NAME/worker-*.log"
