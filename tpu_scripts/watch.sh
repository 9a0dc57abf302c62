#!/usr/bin/env bash
# Auto-resume: poll the slice; when it is preempted (or gone), re-create it, set it up, relaunch the
# run exactly as launch.sh started it (the arguments it recorded beside the checkpoints on GCS). The
# run resumes from its last checkpoint.
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/watch.sh --name NAME --zone ZONE --type TYPE --checkpoint_dir gs://BUCKET/RUN/checkpoints
                            [--ref REF] [--spot] [--queued] [--every 300] [--project P] [--dry-run]

  Start the run with launch.sh --checkpoint_dir first. Every --every seconds, reads the slice's state;
  on PREEMPTED, TERMINATED or a missing slice it runs delete.sh, create.sh, setup.sh, sync.sh and
  launch.sh --relaunch (the launch recorded in CHECKPOINT_DIR/launch_args.txt, overrides included).
  --dry-run prints the commands of one recovery and exits.
USAGE
}

CKPT=""
EVERY=300
create_flags=()
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) TPU_TYPE="$2"; shift 2 ;;
    --checkpoint_dir) CKPT="$2"; shift 2 ;;
    --ref) SAIL_REF="$2"; shift 2 ;;
    --spot|--queued) create_flags+=("$1"); shift ;;
    --every) EVERY="$2"; shift 2 ;;
    --config|--run|--log_bucket|--) die "$1: watch.sh relaunches what launch.sh recorded; give these to launch.sh" ;;
    *) die "unknown flag $1" ;;
  esac
done
require TPU_NAME --name
require TPU_ZONE --zone
require CKPT --checkpoint_dir
[[ "$CKPT" == gs://* ]] || die "--checkpoint_dir must be on GCS (gs://...): a re-created slice has fresh disks"

here="$(dirname "$0")"
common=(--name "$TPU_NAME" --zone "$TPU_ZONE")
if [[ -n "$TPU_PROJECT" ]]; then
  common+=(--project "$TPU_PROJECT")
fi
if [[ "$DRY_RUN" == 1 ]]; then
  common+=(--dry-run)
fi
delete_flags=()
for f in "${create_flags[@]+"${create_flags[@]}"}"; do
  if [[ "$f" == --queued ]]; then
    delete_flags+=(--queued)
  fi
done

recover() {
  bash "$here/delete.sh" "${common[@]}" "${delete_flags[@]+"${delete_flags[@]}"}" || true
  bash "$here/create.sh" "${common[@]}" --type "$TPU_TYPE" "${create_flags[@]+"${create_flags[@]}"}"
  bash "$here/setup.sh" "${common[@]}" --ref "$SAIL_REF"
  bash "$here/sync.sh" "${common[@]}" configs
  bash "$here/launch.sh" "${common[@]}" --relaunch "$CKPT"
}

where
if [[ "$DRY_RUN" == 1 ]]; then
  run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}" --format='value(state)'
  recover
  exit 0
fi
while true; do
  state="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}" --format='value(state)' 2>/dev/null || echo MISSING)"
  case "$state" in
    PREEMPTED|TERMINATED|MISSING)
      echo "$(date -u +%FT%TZ) $TPU_NAME is $state: recreating it and relaunching the run of $CKPT"
      recover ;;
    *) ;;
  esac
  sleep "$EVERY"
done
