"""Sampler throughput: ours (jitted, KV cache) vs Tunix's `Sampler` (JAX) vs transformers `generate`
(PyTorch, CPU) vs our model decoding without a cache, on identical weights; plus one decode step against its floors: the bytes it
must read at the machine's streaming read bandwidth, and its FLOPs at the rate this machine multiplies
a batch-sized matrix by a weight matrix (small-batch decoding is bound by that GEMM rate on a CPU).

    python benchmarks/sampling.py            # tiny config and the SmolLM2-135M shape
    python benchmarks/sampling.py --quick    # tiny config only, fewer tokens

Every row generates exactly `new_tokens` per sequence (no EOS can stop it early). Needs the `test`
extra (torch); the Tunix rows need Tunix (see benchmarks/tunix_peer.py; the script prints the install
line when it is missing). Numbers are medians of `--repeats` timed runs after one warm-up (compile)
run. Sampling is at temperature 1 (Tunix through top-p 1.0, its only way to sample at T = 1); greedy
rows time ours and Tunix's argmax decoding, whose tokens are checked equal first.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import tunix_peer
from common import SHAPES, median_time

from sail_jax.models import load_pretrained
from sail_jax.sampling import cache_length, generate

def _read_bandwidth(nbytes=1 << 30):
    """Streaming read rate (a sum over 1 GiB, larger than any cache): what a decode step that only
    reads its weights and KV cache could reach."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    return nbytes / median_time(lambda: total(x).block_until_ready(), 5)


def _gemm_rate(rows, hidden, intermediate, nbytes=512 << 20):
    """FLOP/s of ``[rows, hidden] @ [hidden, intermediate]`` float32 matmuls streaming 512 MiB of
    distinct weights: the rate a decode step's projections can run at for this batch."""
    weights = jnp.ones((max(1, nbytes // (4 * hidden * intermediate)), hidden, intermediate), jnp.float32)
    x = jnp.ones((rows, hidden), jnp.float32)
    chain = jax.jit(lambda x, w: jax.lax.scan(lambda c, wi: (c + jnp.sum(x @ wi), None), 0.0, w)[0])
    return 2 * rows * weights.size / median_time(lambda: chain(x, weights).block_until_ready(), 5)


def _no_cache_decode(model, ids, mask, new_tokens):
    """Greedy decoding by re-running the full forward on the growing sequence (one jit per length)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, ids, mask):
        logits = nnx.merge(graphdef, state)(ids, mask)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def run():
        cur_ids, cur_mask = jnp.asarray(ids), jnp.asarray(mask)
        for _ in range(new_tokens):
            token = step(state, cur_ids, cur_mask)
            cur_ids = jnp.concatenate([cur_ids, token[:, None]], axis=1)
            cur_mask = jnp.concatenate([cur_mask, jnp.ones_like(token)[:, None]], axis=1)
        return cur_ids.block_until_ready()

    return run


def bench_shape(name, batch, prompt_len, new_tokens, repeats, with_no_cache, with_tunix):
    import torch
    import transformers

    torch.manual_seed(0)
    # RoPE base 1e6: Tunix 0.1.7's Llama3 attention applies that base whatever its config says, and
    # all three samplers must compute the same function (the base does not change the cost).
    config = transformers.LlamaConfig(**SHAPES[name], max_position_embeddings=4096, rope_theta=1_000_000.0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        model = load_pretrained(path)
        if with_tunix:
            tunix_model, tunix_config = tunix_peer.load_llama(path)
    rng = np.random.RandomState(0)
    ids = rng.randint(1, config.vocab_size, (batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    tokens = batch * new_tokens
    key = jax.random.PRNGKey(0)

    def ours():
        out = generate(model, ids, mask, key, max_new_tokens=new_tokens, temperature=1.0, eos_ids=[-1])
        out.tokens.block_until_ready()

    def hf_generate():
        with torch.no_grad():
            hf.generate(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(), do_sample=True,
                        max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                        top_k=0)

    rows = {"ours (jit + KV cache)": median_time(ours, repeats),
            "transformers generate (torch CPU)": median_time(hf_generate, repeats)}
    if with_tunix:
        tunix_sample = tunix_peer.sampler(tunix_model, tunix_config, cache_length(prompt_len, new_tokens))
        ours_greedy = generate(model, ids, mask, key, max_new_tokens=new_tokens, temperature=0.0, eos_ids=[-1])
        if not np.array_equal(np.asarray(ours_greedy.tokens)[:, :new_tokens],
                              np.stack(tunix_sample(ids, new_tokens, 0.0))):
            raise SystemExit(f"{name}: Tunix's greedy tokens differ from ours; the weights or the model differ")
        rows["Tunix Sampler (T = 1, top-p 1.0)"] = median_time(lambda: tunix_sample(ids, new_tokens, 1.0), repeats)
        rows["ours, greedy"] = median_time(lambda: generate(
            model, ids, mask, key, max_new_tokens=new_tokens, temperature=0.0, eos_ids=[-1]).tokens
            .block_until_ready(), repeats)
        rows["Tunix Sampler, greedy"] = median_time(lambda: tunix_sample(ids, new_tokens, 0.0), repeats)
    if with_no_cache:
        rows["ours without cache"] = median_time(_no_cache_decode(model, ids, mask, new_tokens), 1)

    # One decode step, prefill excluded: the same call with a single new token is timed and removed.
    first = median_time(lambda: generate(model, ids, mask, key, max_new_tokens=1, eos_ids=[-1]).tokens
                        .block_until_ready(), repeats)
    step = (rows["ours (jit + KV cache)"] - first) / (new_tokens - 1)
    # What a step must do: read every weight once, and the KV cache, which our attention reads whole
    # (prompt and budget bucketed); multiply the batch by every projection and the output embedding.
    head_dim = config.hidden_size // config.num_attention_heads
    cache_len = cache_length(prompt_len, new_tokens)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    matmul_params = n_params - config.vocab_size * config.hidden_size * (not config.tie_word_embeddings)
    kv_bytes = 2 * config.num_hidden_layers * batch * cache_len * config.num_key_value_heads * head_dim * 4
    flops = 2 * batch * (matmul_params + 2 * config.num_hidden_layers * cache_len * config.num_attention_heads
                         * head_dim)
    step_stats = dict(step=step, bytes=4 * n_params + kv_bytes, flops=flops,
                      gemm=_gemm_rate(batch, config.hidden_size, config.intermediate_size))
    return rows, tokens, step_stats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-cache-shapes", default="tiny", help="comma list of shapes that also time no-cache decoding")
    args = parser.parse_args()
    shapes = ["tiny"] if args.quick else list(SHAPES)
    new_tokens = 32 if args.quick else args.new_tokens
    tunix_missing = tunix_peer.available()
    if tunix_missing:
        print(tunix_missing)
    bandwidth = _read_bandwidth()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
          f"on {jax.devices()[0].platform}; streaming read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"batch {args.batch}, prompt {args.prompt}, {new_tokens} new tokens, median of {args.repeats}\n")
    print("| shape | sampler | seconds | tokens/s | vs transformers |")
    print("|---|---|---|---|---|")
    steps = []
    for shape in shapes:
        rows, tokens, stats = bench_shape(shape, args.batch, args.prompt, new_tokens, args.repeats,
                                          shape in args.no_cache_shapes.split(","), not tunix_missing)
        hf_time = rows["transformers generate (torch CPU)"]
        for label, seconds in rows.items():
            print(f"| {shape} | {label} | {seconds:.2f} | {tokens / seconds:,.0f} | {hf_time / seconds:.2f}x |")
        steps.append((shape, stats))
    print(f"\n| shape | decode step (ms) | reads (MB) | read floor (ms) | GFLOP/s reached | batch-{args.batch} "
          "GEMM GFLOP/s | compute floor (ms) |")
    print("|---|---|---|---|---|---|---|")
    for shape, st in steps:
        print(f"| {shape} | {st['step'] * 1e3:.2f} | {st['bytes'] / 1e6:.1f} | {st['bytes'] / bandwidth * 1e3:.2f} | "
              f"{st['flops'] / st['step'] / 1e9:.0f} | {st['gemm'] / 1e9:.0f} | {st['flops'] / st['gemm'] * 1e3:.2f} |")


if __name__ == "__main__":
    main()
