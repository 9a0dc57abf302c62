"""The main job: SAIL online alignment, by default on the built-in task, end to end.

With no ``model.path`` the built-in task is prepared in ``task.dir`` (once; later runs reuse it):
a BPE tokenizer and a tiny random Qwen2-architecture model, SFT on demonstrations (the offline SFT
recipe), and an offline preference set of SFT samples labelled by the oracle under Bradley–Terry.
Then the online loop runs, evaluates against the SFT policy, and writes a summary table, a plot,
checkpoints, metrics and the exported policy into the workdir.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sail_jax.data import builtin_task
from sail_jax.data.pipeline import encode_online, load_records, train_iterator
from sail_jax.models import ModelConfig, build_model, load_pretrained, save_pretrained
from sail_jax.evaluate import decode_responses
from sail_jax.online import OnlineLoop
from sail_jax.rewards import make_reward_source
from sail_jax.sampling import generate
from sail_jax.sharding import make_mesh, sharding_fn
from sail_jax.tokenization import Tokenizer, pad_left, train_bpe_tokenizer
from sail_jax.validation import validate_online_config


def _write_jsonl(path: str, rows) -> str:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)  # complete or absent: a crash never leaves half a file
    return path


def prepare_builtin_task(config, workdir: str) -> dict[str, str]:
    """Build (or reuse) the built-in task's files; returns model/data paths."""
    from sail_jax.configs import base_config
    from sail_jax.recipes.offline import run as run_offline

    task = config.task
    root = os.path.abspath(task.dir or os.path.join(workdir, "task"))
    base, sft = os.path.join(root, "base"), os.path.join(root, "sft")
    paths = {"model": os.path.join(sft, "export"), "train": os.path.join(root, "preferences_train.jsonl"),
             "eval": os.path.join(root, "preferences_eval.jsonl")}
    if not os.path.exists(os.path.join(paths["model"], "config.json")):
        os.makedirs(base, exist_ok=True)
        tokenizer = train_bpe_tokenizer(builtin_task.tokenizer_corpus(), vocab_size=600)
        model_config = ModelConfig(model_type="qwen2", vocab_size=tokenizer.vocab_size, hidden_size=64,
                                   intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                   qkv_bias=True, tie_word_embeddings=True, eos_token_id=tokenizer.eos_id,
                                   pad_token_id=tokenizer.pad_id)
        save_pretrained(build_model(model_config, seed=config.seed), base, tokenizer=tokenizer)
        sft_cfg = base_config("sft")
        sft_cfg.model.path = base
        sft_cfg.data.train_path = _write_jsonl(os.path.join(root, "sft_train.jsonl"),
                                               builtin_task.sft_records(task.sft_examples, seed=0))
        sft_cfg.data.max_prompt_length = config.data.max_prompt_length
        sft_cfg.data.max_length = config.data.max_prompt_length + config.data.max_response_length
        sft_cfg.mesh = config.mesh
        sft_cfg.batch_size, sft_cfg.steps, sft_cfg.log_every = 32, task.sft_steps, 50
        sft_cfg.optim.learning_rate, sft_cfg.optim.warmup_steps = 3e-3, 20
        sft_cfg.checkpoint.every = 0
        logging.info("built-in task: SFT warm start (%d steps) in %s", task.sft_steps, sft)
        run_offline(sft_cfg, sft)
    if not os.path.exists(paths["eval"]):
        tokenizer = Tokenizer.from_pretrained(paths["model"])
        model = load_pretrained(paths["model"])
        for split, n, seed in (("train", task.preference_train, 1), ("eval", task.preference_eval, 2)):
            rows = _oracle_labelled_pairs(model, tokenizer, config, n, seed, float(task.label_temperature))
            _write_jsonl(paths[split], rows)
    return paths


def _oracle_labelled_pairs(model, tokenizer, config, n: int, seed: int, temperature: float) -> list[dict]:
    """Two SFT samples per prompt, labelled by the oracle: P(a ≻ b) = σ((r_a − r_b) / temperature)."""
    prompts = builtin_task.prompts(n, seed=100 + seed)
    ids, mask = pad_left([tokenizer.encode_prompt(p) for p in prompts], config.data.max_prompt_length,
                         tokenizer.pad_id)
    out = generate(model, ids, mask, jax.random.key(seed), max_new_tokens=config.data.max_response_length - 1,
                   eos_ids=tokenizer.eos_id, num_samples=2, pad_id=tokenizer.pad_id)
    tokens, smask = np.asarray(out.tokens), np.asarray(out.mask)
    finished = np.asarray(out.finished)
    texts = decode_responses(tokenizer, tokens, smask)
    rng = np.random.RandomState(seed)
    rows = []
    for i, prompt in enumerate(prompts):
        a, b = texts[2 * i], texts[2 * i + 1]
        fits = all(len(tokenizer.encode_response(prompt, t)) <= config.data.max_response_length for t in (a, b))
        if a == b or not (finished[2 * i] and finished[2 * i + 1] and fits):
            continue  # no preference between identical responses; unfinished ones cannot be encoded whole
        ra, rb = builtin_task.oracle_reward(prompt, a), builtin_task.oracle_reward(prompt, b)
        a_wins = rng.rand() < 1.0 / (1.0 + np.exp(-(ra - rb) / temperature))
        rows.append({"prompt": prompt, "chosen": a if a_wins else b, "rejected": b if a_wins else a})
    return rows


def run(config, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    builtin = not config.model.path
    if builtin:
        paths = prepare_builtin_task(config, workdir)
        config.model.path, config.data.train_path, config.data.eval_path = paths["model"], paths["train"], paths["eval"]
    validate_online_config(config)
    mesh = make_mesh(dict(config.mesh))
    tokenizer = Tokenizer.from_pretrained(config.model.tokenizer_path or config.model.path)
    d = config.data
    encoded, records = {}, {}
    for split in ("train", "eval"):
        records[split] = load_records(d, split, "preference")
        encoded[split] = encode_online(records[split], tokenizer, max_prompt_length=d.max_prompt_length,
                                       max_response_length=d.max_response_length, on_error=d.get("on_error", "raise"))
    eval_prompts = [records["eval"].rows[i]["prompt"] for i in encoded["eval"].arrays["index"]]
    model = load_pretrained(config.model.path, jnp.dtype(config.model.dtype), shardings=sharding_fn(mesh))
    reward_source = make_reward_source(config.reward)
    loop = OnlineLoop(
        config, model=model, tokenizer=tokenizer, mesh=mesh, workdir=workdir,
        prompt_iterator=train_iterator(encoded["train"].arrays, config.batch_size // jax.process_count(),
                                       seed=config.seed, process_index=jax.process_index(),
                                       process_count=jax.process_count()),
        train_prompts=[r["prompt"] for r in records["train"].rows], reward_source=reward_source,
        evaluator_args={"prompts": eval_prompts, "eval_arrays": encoded["eval"].arrays,
                        "batch_size": config.eval_batch_size})
    initial, final = loop.run()
    summary = {"variant": config.get("variant", ""), "steps": config.steps,
               "reference": {k: initial[k] for k in ("reward", "win_rate", "kl")},
               "final": {k: final[k] for k in ("reward", "win_rate", "kl", "heldout/rewards/accuracies")},
               "train_seconds": loop.seconds["steps"],
               "generation_share": loop.seconds["generation"] / max(loop.seconds["steps"], 1e-9)}
    if jax.process_index() == 0:
        save_pretrained(loop.export_model(), os.path.join(workdir, "export"), tokenizer=tokenizer)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        _plot(workdir)
        _print_summary(summary, loop.evaluator.sample_table(), builtin)
    return summary


def _print_summary(summary, samples, builtin: bool):
    name = summary["variant"] or "policy"
    rows = [("SFT / reference", summary["reference"]), (f"{name} (final)", summary["final"])]
    print(f"\n{'':<22} {'reward':>8} {'win rate vs SFT':>16} {'KL(π‖π_ref)':>12}")
    for label, m in rows:
        print(f"{label:<22} {m['reward']:>8.3f} {m['win_rate']:>16.3f} {m['kl']:>12.3f}")
    print("\nsamples (reference → policy, with " + ("oracle" if builtin else "reward") + " scores):")
    for prompt, ref, r_ref, pol, r_pol in samples:
        print(f"  {prompt!s:<32} {ref!r} ({r_ref:+.2f}) → {pol!r} ({r_pol:+.2f})")


def _plot(workdir: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = sorted({r["step"]: r for r in rows if r["split"] == "eval"}.values(), key=lambda r: r["step"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [r["step"] for r in evals]
    axes[0].plot(steps, [r["reward"] for r in evals], marker="o")
    axes[0].set(xlabel="step", ylabel="oracle reward (held-out prompts)")
    axes[1].plot([r["kl"] for r in evals], [r["reward"] for r in evals], marker="o")
    axes[1].set(xlabel="KL(π‖π_ref)", ylabel="oracle reward")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "curves.png"), dpi=100)
    plt.close(fig)
