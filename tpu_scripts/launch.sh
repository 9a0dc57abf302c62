#!/usr/bin/env bash
# Start a config on every worker of the slice, detached, logging to disk (and to a bucket).
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/launch.sh --name NAME --zone ZONE --config configs/FILE.py --run RUN
                             [--checkpoint_dir gs://BUCKET/RUN/checkpoints] [--log_bucket gs://BUCKET/logs]
                             [--task_bucket gs://BUCKET/RUN/task]
                             [--project P] [--dry-run] [-- --config.key=value ...]
       tpu_scripts/launch.sh --name NAME --zone ZONE --relaunch gs://BUCKET/RUN/checkpoints [--dry-run]

  Runs `sail-jax --multihost --config=... --workdir=~/sail-runs/RUN` on all workers in a detached
  session (it survives the ssh connection). Logs: ~/sail-runs/RUN/worker-HOST.log on each worker,
  copied to --log_bucket every minute when given. With --checkpoint_dir on GCS, a run relaunched on
  a new slice (tpu_scripts/watch.sh does this after a preemption) resumes from its last checkpoint.
  Arguments after -- go to sail-jax unchanged. With --checkpoint_dir, the launch's own arguments are
  recorded in CHECKPOINT_DIR/launch_args.txt; --relaunch CHECKPOINT_DIR starts exactly that launch again.
  --task_bucket (SAIL configs that build a task, e.g. configs/sail_pp.py): a multi-host run cannot
  build its task files, so worker 0 first builds them in one CPU process (`sail-jax task`; reused when
  the bucket already has them) and uploads them; every worker downloads them before the run starts.
USAGE
}

CONFIG=""
RUN_NAME=""
CKPT=""
LOG_BUCKET=""
TASK_BUCKET=""
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
if [[ "${1:-}" == --relaunch ]]; then
  [[ $# -eq 2 ]] || die "--relaunch takes the checkpoint dir and nothing else"
  record="$2/launch_args.txt"
  where_flags=(--name "$TPU_NAME" --zone "$TPU_ZONE")
  if [[ -n "$TPU_PROJECT" ]]; then
    where_flags+=(--project "$TPU_PROJECT")
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    run gsutil cat "$record"
    echo "# then: tpu_scripts/launch.sh ${where_flags[*]} <the recorded arguments>"
    exit 0
  fi
  recorded="$(gsutil cat "$record")" || die "no launch recorded at $record (launch the run once with launch.sh)"
  args=()
  eval "args=($recorded)"
  exec bash "$0" "${where_flags[@]}" "${args[@]}"
fi
record_args=()
for a in "$@"; do
  record_args+=("$(quote "$a")")
done
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --run) RUN_NAME="$2"; shift 2 ;;
    --checkpoint_dir) CKPT="$2"; shift 2 ;;
    --log_bucket) LOG_BUCKET="$2"; shift 2 ;;
    --task_bucket) TASK_BUCKET="$2"; shift 2 ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown flag $1 (sail-jax overrides go after --)" ;;
  esac
done
require TPU_NAME --name
require TPU_ZONE --zone
require CONFIG --config
require RUN_NAME --run
[[ "$RUN_NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run $RUN_NAME: use letters, digits, '.', '_' and '-'"

workdir="\$HOME/sail-runs/$RUN_NAME"
log="$workdir/worker-\$(hostname).log"
cmd="sail-jax --multihost --config=$CONFIG --workdir=$workdir"
if [[ -n "$CKPT" ]]; then
  cmd+=" --config.checkpoint.dir=$CKPT"
fi
quoted_overrides=""
for o in "${overrides[@]+"${overrides[@]}"}"; do
  quoted_overrides+=" $(printf '%q' "$o")"
done
if [[ -n "$TASK_BUCKET" ]]; then
  [[ "$quoted_overrides" != *--config.task.dir=* ]] || die "--task_bucket sets the task's folder; drop --config.task.dir"
  task_dir="$workdir/task"
  task_flags="--config=$CONFIG --workdir=$workdir --config.task.dir=$task_dir$quoted_overrides"
  # Worker 0 builds the files once, in one CPU process (a slice's TPU runtime expects every worker),
  # starting from what the bucket already holds, and uploads them.
  where
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=0 --command="cd $SAIL_HOME && \
. ~/sail-venv/bin/activate && mkdir -p $task_dir && { gsutil -m -q rsync -r $TASK_BUCKET $task_dir || true; } && \
JAX_PLATFORMS=cpu sail-jax task $task_flags && gsutil -m -q rsync -r $task_dir $TASK_BUCKET"
  cmd="mkdir -p $task_dir && gsutil -m -q rsync -r $TASK_BUCKET $task_dir && $cmd --config.task.dir=$task_dir"
fi
cmd+="$quoted_overrides"
copy=":"
if [[ -n "$LOG_BUCKET" ]]; then
  copy="gsutil -q cp $log $LOG_BUCKET/$RUN_NAME/"
  cmd="(while sleep 60; do $copy; done) & copier=\$!; $cmd; status=\$?; kill \$copier; $copy; exit \$status"
fi
if [[ -n "$CKPT" && "$DRY_RUN" == 1 ]]; then  # what --relaunch (and watch.sh) will start again
  echo "# $CKPT/launch_args.txt: ${record_args[*]}"
elif [[ -n "$CKPT" ]]; then
  echo "${record_args[*]}" | gsutil -q cp - "$CKPT/launch_args.txt"
fi
on_all_workers "cd $SAIL_HOME && . ~/sail-venv/bin/activate && mkdir -p $workdir && \
setsid nohup bash -c '$cmd' > $log 2>&1 < /dev/null & echo \"started on \$(hostname): $log\""
