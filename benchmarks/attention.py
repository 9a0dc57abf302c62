"""The blockwise causal attention against the dense attention it replaced, in one model step.

SmolLM2-135M's shape (random weights), packed rows of long-tailed sequences (several per row, as
``data.packing`` builds them), forward and backward of the log-likelihood with each decoder layer
checkpointed (``model.remat=full``, the DPO benchmark's setting), float32, XLA:CPU's
memory-minimising schedule (what the CLI sets). The two arms are compiled once each and then timed
alternately, so a machine whose speed drifts hits both alike; the losses must agree.

    python benchmarks/attention.py                  # 3 rows of 1024, 5 paired repeats
    python benchmarks/attention.py --rows 2 --width 512 --repeats 3
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import model_config  # noqa: E402
from flax import nnx  # noqa: E402

from sail_jax.models import attention, build_model  # noqa: E402


def packed_rows(rows: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and segment ids of ``rows`` rows filled first-fit with log-normal lengths (median 250)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 49000, (rows, width)).astype(np.int32)
    segments = np.zeros((rows, width), np.int32)
    for r in range(rows):
        at, seg = 0, 0
        while at < width - 16:
            n = int(min(np.exp(rng.normal(np.log(250), 0.6)), width - at))
            seg += 1
            segments[r, at:at + n] = seg
            at += n
    return ids, segments


def step_fn(graphdef, max_blocks: int):
    """The jitted loss-and-gradient step, traced with ``attention.CAUSAL_MAX_BLOCKS = max_blocks`` (1: dense)."""
    def loss(state, ids, segments):
        logits = nnx.merge(graphdef, state)(ids, segment_ids=segments)
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        token = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        return jnp.sum(token * (segments[:, 1:] == segments[:, :-1]) * (segments[:, 1:] > 0)) / ids.size

    jitted = jax.jit(jax.value_and_grad(loss))

    def run(state, ids, segments):
        saved = attention.CAUSAL_MAX_BLOCKS
        attention.CAUSAL_MAX_BLOCKS = max_blocks  # read while tracing: the first call fixes the program
        try:
            return jax.block_until_ready(jitted(state, ids, segments))
        finally:
            attention.CAUSAL_MAX_BLOCKS = saved

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = model_config("smollm2-135m").replace(remat="full")
    graphdef, state = nnx.split(build_model(config, seed=0))
    ids, segments = (jnp.asarray(x) for x in packed_rows(args.rows, args.width))
    arms = {"dense": step_fn(graphdef, 1), "blockwise causal": step_fn(graphdef, attention.CAUSAL_MAX_BLOCKS)}
    first, losses, times = {}, {}, {name: [] for name in arms}
    for name, fn in arms.items():
        start = time.perf_counter()
        losses[name] = float(fn(state, ids, segments)[0])
        first[name] = time.perf_counter() - start
    for _ in range(args.repeats):
        for name, fn in arms.items():
            start = time.perf_counter()
            fn(state, ids, segments)
            times[name].append(time.perf_counter() - start)
    dense = statistics.median(times["dense"])
    print(f"\n## Attention in a SmolLM2-135M step: {args.rows} packed rows of {args.width} "
          f"({int((segments > 0).sum())} tokens, {int(segments.max())} sequences in the fullest row), "
          f"remat full, float32 ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__})\n")
    print("| attention | compile + first step (s) | step, median (s) | vs dense | loss |")
    print("|---|---|---|---|---|")
    for name in arms:
        step = statistics.median(times[name])
        print(f"| {name} | {first[name]:.1f} | {step:.2f} | {step / dense:.2f}x | {losses[name]:.6f} |")


if __name__ == "__main__":
    main()
