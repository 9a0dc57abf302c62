#!/usr/bin/env bash
# Auto-resume: poll the slice; when it is preempted (or gone), re-create it, set it up, relaunch the
# run. The run resumes from its last checkpoint, which must live on GCS (--checkpoint_dir).
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/watch.sh --name NAME --zone ZONE --type TYPE --config configs/FILE.py --run RUN
                            --checkpoint_dir gs://BUCKET/RUN/checkpoints [--log_bucket gs://...]
                            [--ref REF] [--spot] [--queued] [--every 300] [--project P] [--dry-run]
                            [-- --config.key=value ...]

  Every --every seconds, reads the slice's state; on PREEMPTED, TERMINATED or a missing slice it runs
  delete.sh, create.sh, setup.sh, sync.sh and launch.sh with these flags. --dry-run prints the
  commands of one recovery and exits.
USAGE
}

CONFIG=""
RUN_NAME=""
CKPT=""
LOG_BUCKET=""
EVERY=300
create_flags=()
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) TPU_TYPE="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --run) RUN_NAME="$2"; shift 2 ;;
    --checkpoint_dir) CKPT="$2"; shift 2 ;;
    --log_bucket) LOG_BUCKET="$2"; shift 2 ;;
    --ref) SAIL_REF="$2"; shift 2 ;;
    --spot|--queued) create_flags+=("$1"); shift ;;
    --every) EVERY="$2"; shift 2 ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown flag $1" ;;
  esac
done
require TPU_NAME --name
require TPU_ZONE --zone
require CONFIG --config
require RUN_NAME --run
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
launch_flags=(--config "$CONFIG" --run "$RUN_NAME" --checkpoint_dir "$CKPT")
if [[ -n "$LOG_BUCKET" ]]; then
  launch_flags+=(--log_bucket "$LOG_BUCKET")
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
  bash "$here/launch.sh" "${common[@]}" "${launch_flags[@]}" -- "${overrides[@]+"${overrides[@]}"}"
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
      echo "$(date -u +%FT%TZ) $TPU_NAME is $state: recreating and relaunching $RUN_NAME"
      recover ;;
    *) ;;
  esac
  sleep "$EVERY"
done
