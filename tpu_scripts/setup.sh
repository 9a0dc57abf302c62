#!/usr/bin/env bash
# Install sail-jax with JAX's TPU extra on every worker, from a git ref or from a wheel.
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/setup.sh --name NAME --zone ZONE [--repo URL] [--ref REF | --wheel FILE.whl]
                            [--project P] [--dry-run]

  --repo    git repository to clone on each worker (default $SAIL_REPO, else
            https://github.com/sail-jax/sail-jax.git); an existing clone keeps its origin
  --ref     branch, tag or commit to check out (default main)
  --wheel   install this local wheel instead (copied to every worker); constraints.txt is still
            taken from the checkout at --ref so every worker gets the same pinned stack
  Each worker gets ~/sail-jax and ~/sail-venv, a venv on Python $SAIL_PYTHON (default 3.12) made by
  uv $UV_VERSION whatever the image's own Python is (tpu-ubuntu2204-base has 3.10, which the pinned
  stack does not support), then `uv pip install -c constraints.txt -e ".[tpu]"` (libtpu pinned there).
USAGE
}

SAIL_PYTHON="${SAIL_PYTHON:-3.12}"  # inside setup.py's python_requires
UV_VERSION="${UV_VERSION:-0.13.9}"
WHEEL=""
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --repo) SAIL_REPO="$2"; shift 2 ;;
    --ref) SAIL_REF="$2"; shift 2 ;;
    --wheel) WHEEL="$2"; shift 2 ;;
    *) die "unknown flag $1" ;;
  esac
done
require TPU_NAME --name
require TPU_ZONE --zone
# Fetch the ref itself and check out what it names now (a branch on an existing clone advances too).
checkout="{ [ -d $SAIL_HOME/.git ] || git clone -q $SAIL_REPO $SAIL_HOME; } && \
git -C $SAIL_HOME fetch -q origin $SAIL_REF && git -C $SAIL_HOME checkout -q --detach FETCH_HEAD"
# uv brings its own interpreter, so the venv does not depend on the image's Python or its python3-venv.
venv="python3 -m pip install -q --user uv==$UV_VERSION && ~/.local/bin/uv venv -q --seed --python $SAIL_PYTHON \
~/sail-venv && . ~/sail-venv/bin/activate"
if [[ -n "$WHEEL" ]]; then
  [[ "$DRY_RUN" == 1 || -f "$WHEEL" ]] || die "--wheel $WHEEL does not exist"
  where
  run gcloud compute tpus tpu-vm scp "$WHEEL" "$TPU_NAME":~/ "${WHERE[@]}" --worker=all
  install="\$HOME/.local/bin/uv pip install -q -c $SAIL_HOME/constraints.txt \"\$HOME/$(basename "$WHEEL")[tpu]\""
else
  install="\$HOME/.local/bin/uv pip install -q -c $SAIL_HOME/constraints.txt -e \"${SAIL_HOME}[tpu]\""
fi
on_all_workers "set -e; $checkout; $venv; $install; python -c 'import jax; print(jax.process_index(), jax.device_count())'"
