#!/usr/bin/env bash
# Shared by the tpu_scripts: flag parsing, defaults, and `run` (prints the command under --dry-run).
# Every flag can also come from the environment: --name <-> TPU_NAME, --zone <-> TPU_ZONE, ...
set -euo pipefail

TPU_NAME="${TPU_NAME:-}"
TPU_ZONE="${TPU_ZONE:-}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_TYPE="${TPU_TYPE:-v4-8}"
TPU_RUNTIME="${TPU_RUNTIME:-tpu-ubuntu2204-base}"
SAIL_REPO="${SAIL_REPO:-https://github.com/sail-jax/sail-jax.git}"
SAIL_REF="${SAIL_REF:-main}"
SAIL_HOME="${SAIL_HOME:-sail-jax}"  # checkout on each worker, relative to the remote home directory
DRY_RUN=0

# Parse the flags every script takes; the caller's own flags come back in REST (an array).
parse_common() {
  REST=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) TPU_NAME="$2"; shift 2 ;;
      --zone) TPU_ZONE="$2"; shift 2 ;;
      --project) TPU_PROJECT="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      *) REST+=("$1"); shift ;;
    esac
  done
}

die() {
  echo "error: $*" >&2
  echo "run with --help for usage" >&2
  exit 2
}

require() {  # require VAR_NAME --flag: fail naming the flag (and the environment variable, if any)
  if [[ -z "${!1}" ]]; then
    if [[ "$1" == TPU_* ]]; then
      die "$2 is required (or set $1)"
    fi
    die "$2 is required"
  fi
}

# The gcloud flags naming the TPU: zone, and project when given.
where() {
  WHERE=(--zone="$TPU_ZONE")
  if [[ -n "$TPU_PROJECT" ]]; then
    WHERE+=(--project="$TPU_PROJECT")
  fi
}

# One argument as the shell reads it back: bare when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Print the command (quoted, ready to paste) under --dry-run, else run it.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local line="" a
    for a in "$@"; do
      line+="$(quote "$a") "
    done
    echo "${line% }"
  else
    "$@"
  fi
}

# Run a shell command on every worker of the slice (the same command on all, as JAX expects).
on_all_workers() {
  where
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$1"
}
