"""Full training vs LoRA at one model shape, side by side in one run: per-device bytes of what a DPO
run holds (trained parameters, optimizer state, the frozen base, the reference) and the DPO train
step's time; and, for sampling, the adapters applied in every forward vs merged into a plain model
once per generation block (the merge's own cost included).

    python benchmarks/lora.py            # the SmolLM2-135M shape (float32, AdamW, r = 64)
    python benchmarks/lora.py --quick    # the tiny shape

Medians of `--repeats` calls after a warm-up (compile) call.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np
from common import SHAPES, median_time
from flax import nnx

from sail_jax.configs import base_config
from sail_jax.models import ModelConfig, build_model
from sail_jax.objectives import make_dpo_objective
from sail_jax.optim import make_optimizer
from sail_jax.sampling import generate
from sail_jax.sharding import bytes_per_device, make_mesh, shard_batch
from sail_jax.train import make_train_step
from sail_jax.trainable import prepare

GIB = 1024**3


def _model_config(name: str) -> ModelConfig:
    s = SHAPES[name]
    return ModelConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                       intermediate_size=s["intermediate_size"], num_layers=s["num_hidden_layers"],
                       num_heads=s["num_attention_heads"], num_kv_heads=s["num_key_value_heads"],
                       head_dim=s["hidden_size"] // s["num_attention_heads"],
                       tie_word_embeddings=s.get("tie_word_embeddings", False))


def _batch(vocab, batch, length):
    rng = np.random.RandomState(0)
    out = {}
    for side in ("chosen", "rejected"):
        out[f"{side}_input_ids"] = rng.randint(0, vocab, (batch, length)).astype(np.int32)
        out[f"{side}_attention_mask"] = np.ones((batch, length), np.int32)
        out[f"{side}_loss_mask"] = np.concatenate([np.zeros((batch, length // 2), np.int32),
                                                   np.ones((batch, length - length // 2), np.int32)], 1)
    out["valid"] = np.ones(batch, np.int32)
    return out


def _gib(*trees) -> float:
    return sum(max(bytes_per_device(t).values(), default=0) for t in trees) / GIB


def bench(name: str, rank: int, batch_size: int, length: int, new_tokens: int, repeats: int) -> list[dict]:
    model_config = _model_config(name)
    config = base_config("dpo")
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    batch = shard_batch(_batch(model_config.vocab_size, batch_size, length), mesh)
    rows = []
    for mode in ("full", "lora"):
        config.lora.rank = rank if mode == "lora" else 0
        tx = make_optimizer(config.optim, 100)
        trainable, state, shardings = prepare(build_model(model_config, seed=0), tx, mesh, config.lora, seed=0)
        ref_graphdef, reference = trainable.reference(state.params, shardings.params)
        frozen = {**trainable.frozen, "reference": reference}
        frozen_sh = {**trainable.frozen_shardings,
                     "reference": trainable.frozen_shardings.get("base", shardings.params)}
        step = make_train_step(trainable.graphdef, tx, make_dpo_objective(config.loss, ref_graphdef, "model"), mesh,
                               shardings, frozen_sh, seed=0)
        held = _gib(state.params, state.opt_state, *((trainable.frozen["base"],) if trainable.lora else (reference,)))
        box = {"state": state}

        def run():
            box["state"], metrics = step(box["state"], batch, frozen)
            jax.block_until_ready(metrics["loss"])

        row = {"shape": name, "mode": mode if mode == "full" else f"LoRA r={rank}", "bytes_gib": held,
               "trained_gib": _gib(state.params), "step_s": median_time(run, repeats)}
        if trainable.lora:
            row.update(_sampling(trainable, box["state"].params, batch, new_tokens, repeats))
        rows.append(row)
    return rows


def _sampling(trainable, params, batch, new_tokens, repeats) -> dict:
    """Seconds per generation block of one batch: adapters applied vs merged (merge included)."""
    prompt, mask = batch["chosen_input_ids"], batch["chosen_attention_mask"]

    def sample(model):
        out = generate(model, prompt, mask, jax.random.key(0), max_new_tokens=new_tokens, eos_ids=-1)
        jax.block_until_ready(out.tokens)

    applied = median_time(lambda: sample(trainable.model(params)), repeats)
    t0 = time.perf_counter()
    merged_model = trainable.export_model(params)
    jax.block_until_ready(nnx.state(merged_model))
    merge_s = time.perf_counter() - t0
    merged = median_time(lambda: sample(merged_model), repeats)
    return {"sample_applied_s": applied, "sample_merged_s": merged + merge_s, "merge_s": merge_s}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    name = "tiny" if args.quick else "smollm2-135m"
    rows = bench(name, args.rank, batch_size=4, length=256, new_tokens=32, repeats=args.repeats)
    print(f"{platform.machine()}, {jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}")
    print("| shape | training | params + optimizer + base/reference (GiB/device) | trained params (GiB) "
          "| DPO step (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['mode']} | {r['bytes_gib']:.3f} | {r['trained_gib']:.4f} | {r['step_s']:.2f} |")
    lora = rows[-1]
    print(f"\nsampling 4 x 32 tokens with LoRA: adapters applied {lora['sample_applied_s']:.2f} s, merged "
          f"{lora['sample_merged_s']:.2f} s (of which the merge {lora['merge_s']:.2f} s)")


if __name__ == "__main__":
    main()
