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
  Each worker gets ~/sail-venv and ~/sail-jax; `pip install -c constraints.txt -e ".[tpu]"`.
USAGE
}

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
venv="python3 -m venv ~/sail-venv && . ~/sail-venv/bin/activate && pip install -q -U pip"
if [[ -n "$WHEEL" ]]; then
  [[ "$DRY_RUN" == 1 || -f "$WHEEL" ]] || die "--wheel $WHEEL does not exist"
  where
  run gcloud compute tpus tpu-vm scp "$WHEEL" "$TPU_NAME":~/ "${WHERE[@]}" --worker=all
  install="pip install -q -c $SAIL_HOME/constraints.txt \"\$HOME/$(basename "$WHEEL")[tpu]\""
else
  install="pip install -q -c $SAIL_HOME/constraints.txt -e \"${SAIL_HOME}[tpu]\""
fi
on_all_workers "set -e; $checkout; $venv; $install; python -c 'import jax; print(jax.process_index(), jax.device_count())'"
