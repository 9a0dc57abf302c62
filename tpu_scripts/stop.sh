#!/usr/bin/env bash
# Stop a run on every worker (checkpoints already written stay; relaunching resumes from them).
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/stop.sh --name NAME --zone ZONE --run RUN [--project P] [--dry-run]
USAGE
}

RUN_NAME=""
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run) RUN_NAME="$2"; shift 2 ;;
    *) die "unknown flag $1" ;;
  esac
done
require TPU_NAME --name
require TPU_ZONE --zone
require RUN_NAME --run
on_all_workers "pkill -f -- '--workdir=\$HOME/sail-runs/$RUN_NAME( |\$)' || pkill -f -- 'sail-runs/$RUN_NAME' || true"
