#!/usr/bin/env bash
# Copy local config files (and any other folder) to every worker's checkout.
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/sync.sh --name NAME --zone ZONE [PATH ...] [--project P] [--dry-run]

  Copies each PATH (default: configs) into ~/sail-jax/ on every worker, so a config edited locally
  runs as is. Data files named in a config must be reachable from every worker (copy them too, or
  use gs:// paths for TFDS data).
USAGE
}

parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
require TPU_NAME --name
require TPU_ZONE --zone
if [[ $# -eq 0 ]]; then
  set -- configs
fi
where
for path in "$@"; do
  [[ "$DRY_RUN" == 1 || -e "$path" ]] || die "$path does not exist"
  run gcloud compute tpus tpu-vm scp --recurse "$path" "$TPU_NAME":"$SAIL_HOME"/ "${WHERE[@]}" --worker=all
done
