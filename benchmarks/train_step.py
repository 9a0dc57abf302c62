"""DPO train-step throughput: ours (one jitted step: policy forward+backward on chosen+rejected,
reference forward, AdamW) vs Tunix's `DPOTrainer` step (JAX) vs the same minimal step in PyTorch (CPU)
on identical weights and batch; plus our achieved FLOP/s against a large matmul measured in the same
run. The second step's losses (after one update) of the three are printed side by side: they
must agree.

    python benchmarks/train_step.py            # tiny config and the SmolLM2-135M shape
    python benchmarks/train_step.py --quick    # tiny config only

Needs the `test` extra (torch); the Tunix column needs Tunix (benchmarks/tunix_peer.py; the script
prints the install line when it is missing). Medians of `--repeats` steps after a warm-up (compile)
step.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import tunix_peer
from common import SHAPES, median_time

from sail_jax.configs import base_config
from sail_jax.models import load_pretrained
from sail_jax.objectives import make_dpo_objective
from sail_jax.optim import make_optimizer
from sail_jax.sharding import make_mesh, shard_batch
from sail_jax.train import create_train_state, frozen_copy, make_train_step


def _batch(vocab, batch, length, seed=0):
    """Pairs of rows sharing their first half (the prompt); the second half is the response."""
    rng = np.random.RandomState(seed)
    out = {}
    prompt = rng.randint(0, vocab, (batch, length // 2)).astype(np.int32)
    for side in ("chosen", "rejected"):
        response = rng.randint(0, vocab, (batch, length - length // 2)).astype(np.int32)
        out[f"{side}_input_ids"] = np.concatenate([prompt, response], axis=1)
        out[f"{side}_attention_mask"] = np.ones((batch, length), np.int32)
        loss_mask = np.zeros((batch, length), np.int32)
        loss_mask[:, length // 2:] = 1  # second half is the response
        out[f"{side}_loss_mask"] = loss_mask
    out["valid"] = np.ones(batch, np.int32)
    return out


def _torch_step(path, batch, lr):
    import torch
    import transformers

    policy = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    t = {k: torch.tensor(v).long() for k, v in batch.items()}
    ids = torch.cat([t["chosen_input_ids"], t["rejected_input_ids"]])
    mask = torch.cat([t["chosen_attention_mask"], t["rejected_attention_mask"]])
    loss_mask = torch.cat([t["chosen_loss_mask"], t["rejected_loss_mask"]])[:, 1:].float()
    b = t["chosen_input_ids"].shape[0]

    def logps(model):
        logits = model(ids, attention_mask=mask).logits[:, :-1].float()
        tok = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None])[..., 0]
        return (tok * loss_mask).sum(-1)

    def step():
        with torch.no_grad():
            ref = logps(reference)
        pol = logps(policy)
        h = (pol[:b] - ref[:b]) - (pol[b:] - ref[b:])
        loss = -torch.nn.functional.logsigmoid(0.1 * h).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def _ours_step(path, batch, lr):
    config = base_config("dpo")
    config.optim.learning_rate, config.optim.schedule, config.optim.clip_norm = lr, "constant", 0.0
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    tx = make_optimizer(config.optim, 1000)
    graphdef, state, shardings = create_train_state(load_pretrained(path), tx, mesh)
    frozen = {"reference": frozen_copy(state.params, shardings.params)}
    step = make_train_step(graphdef, tx, make_dpo_objective(config.loss, graphdef, "model"), mesh, shardings,
                           {"reference": shardings.params}, seed=0)
    data = shard_batch(batch, mesh)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], data, frozen)
        return float(metrics["loss"])

    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    return run, n_params


def _matmul_flops(n=2048, repeats=5):
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / median_time(lambda: f(a).block_until_ready(), repeats)


def bench(name, batch_size, length, repeats, with_tunix):
    import torch
    import transformers

    torch.manual_seed(0)
    # RoPE base 1e6: Tunix 0.1.7's Llama3 attention applies that base whatever its config says.
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES[name], max_position_embeddings=4096,
                                                                rope_theta=1_000_000.0))
    batch = _batch(SHAPES[name]["vocab_size"], batch_size, length)
    steps = {}
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        steps["ours"], n_params = _ours_step(path, batch, 1e-5)
        steps["torch"] = _torch_step(path, batch, 1e-5)
        if with_tunix:
            steps["tunix"] = tunix_peer.dpo_step(path, batch, 1e-5)
    # Same weights, batch and optimizer: the second step's loss (after one update) must agree.
    second_loss = {k: [step(), step()][1] for k, step in steps.items()}
    seconds = {k: median_time(step, repeats) for k, step in steps.items()}
    tokens = 2 * batch_size * length  # chosen + rejected rows
    # Policy forward+backward (6 FLOPs per parameter per token) + reference forward (2); attention not counted.
    flops = 8 * n_params * tokens
    return {"shape": name, "seconds": seconds, "second_loss": second_loss, "tokens": tokens, "flops": flops}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    shapes = ["tiny"] if args.quick else ["tiny", "smollm2-135m"]
    tunix_missing = tunix_peer.available()
    if tunix_missing:
        print(tunix_missing)
    peak = _matmul_flops()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
          f"{jax.devices()[0].platform}; batch {args.batch} pairs x {args.length} tokens, float32, AdamW")
    print(f"2048x2048 float32 matmul: {peak / 1e9:.1f} GFLOP/s\n")
    peers = ["torch"] + ([] if tunix_missing else ["tunix"])
    print("| shape | 2nd-step loss (ours / " + " / ".join(peers) + ") | ours s/step | "
          + " | ".join(f"{p} s/step | ours vs {p}" for p in peers) + " | ours tokens/s | ours GFLOP/s | of matmul |")
    print("|---" * (6 + 2 * len(peers)) + "|")
    for name in shapes:
        r = bench(name, args.batch, args.length, args.repeats, not tunix_missing)
        s = r["seconds"]
        achieved = r["flops"] / s["ours"]
        losses = " / ".join(f"{r['second_loss'][k]:.7f}" for k in ["ours"] + peers)
        print(f"| {name} | {losses} | {s['ours']:.3f} | "
              + " | ".join(f"{s[p]:.3f} | {s[p] / s['ours']:.2f}x" for p in peers)
              + f" | {r['tokens'] / s['ours']:,.0f} | {achieved / 1e9:.1f} | {achieved / peak:.0%} |")


if __name__ == "__main__":
    main()
