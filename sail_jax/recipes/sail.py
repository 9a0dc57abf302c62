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
import numpy as np
from absl import logging

from sail_jax.configs import model_options
from sail_jax.data import builtin_task, ifeval_task
from sail_jax.data.pipeline import encode_online, load_records, train_iterator
from sail_jax.models import build_model, load_pretrained, save_pretrained
from sail_jax.evaluate import decode_responses
from sail_jax.online import OnlineLoop
from sail_jax.rewards import make_eval_reward_source, make_reward_source
from sail_jax.sampling import generate
from sail_jax.sharding import make_mesh, sharding_fn
from sail_jax.tokenization import Tokenizer, pad_left, train_bpe_tokenizer
from sail_jax.validation import validate_online_config


def _write_jsonl(path: str, rows) -> str:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)  # complete or absent: a crash never leaves half a file
    return path


def prepare_task(config, workdir: str) -> dict[str, str]:
    """Build (or reuse) the files of ``config.task.name``: the policy folder, the offline preference
    pairs, and the held-out set (pairs, or prompts alone when ``data.eval_kind`` is ``prompt``)."""
    name = config.task.get("name", "builtin")
    if name not in TASKS:
        raise ValueError(f"config.task.name={name!r} is unknown; valid: {sorted(TASKS)}")
    root = os.path.abspath(config.task.dir or os.path.join(workdir, "task"))
    eval_kind = config.data.get("eval_kind", "preference")
    paths = {"train": os.path.join(root, "preferences_train.jsonl"),
             "eval": os.path.join(root, "preferences_eval.jsonl" if eval_kind == "preference" else "prompts_eval.jsonl")}
    model_config = os.path.join(root, TASK_MODEL_DIRS[name], "config.json")
    if jax.process_count() > 1 and not all(map(os.path.exists, [model_config, *paths.values()])):
        raise RuntimeError(f"task files in {root} are missing: build the task once in a single process (same "
                           "config, one host), or point model.path and data.* at existing files")
    paths["model"] = TASKS[name](config, root)
    for split in ("train", "eval"):
        if os.path.exists(paths[split]):
            continue  # each file is written whole or not at all (see _write_jsonl)
        n, seed = (config.task.preference_train, 1) if split == "train" else (config.task.preference_eval, 2)
        if split == "eval" and eval_kind == "prompt":
            rows = [{"prompt": p} for p in _task_prompts(config, split, n, seed)]
        else:
            rows = _oracle_labelled_pairs(load_pretrained(paths["model"]), Tokenizer.from_pretrained(paths["model"]),
                                          config, split, n, seed)
        _write_jsonl(paths[split], rows)
    return paths


def _builtin_model(config, root: str) -> str:
    """The built-in task's policy: a tiny Qwen2-architecture model after SFT on demonstrations."""
    from sail_jax.configs import base_config
    from sail_jax.recipes.offline import run as run_offline

    task = config.task
    base, sft = os.path.join(root, "base"), os.path.join(root, "sft")
    path = os.path.join(root, TASK_MODEL_DIRS["builtin"])
    if not os.path.exists(os.path.join(path, "config.json")):
        os.makedirs(base, exist_ok=True)
        tokenizer = train_bpe_tokenizer(builtin_task.tokenizer_corpus(), vocab_size=builtin_task.VOCAB_SIZE)
        model_config = builtin_task.model_config(tokenizer.vocab_size, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
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
    return path


def _ifeval_model(config, root: str) -> str:
    """The IFEval-style task's policy: a GGUF instruct model (default SmolLM2-135M-Instruct) as is."""
    from sail_jax.models.gguf import bundled_smollm2, ensure_converted

    return ensure_converted(config.task.get("gguf") or bundled_smollm2(), os.path.join(root, TASK_MODEL_DIRS["ifeval"]))


# task name -> (config, task root) -> policy folder (TASK_MODEL_DIRS, under the root); prompts and
# oracle come from TASK_DATA.
TASKS = {"builtin": _builtin_model, "ifeval": _ifeval_model}
TASK_MODEL_DIRS = {"builtin": os.path.join("sft", "export"), "ifeval": "model"}
TASK_DATA = {"builtin": builtin_task, "ifeval": ifeval_task}


def _oracle_labelled_pairs(model, tokenizer, config, split: str, n: int, seed: int) -> list[dict]:
    """``task.pair_samples`` samples of the policy per prompt, turned into (at most) one labelled pair.

    ``task.label_temperature`` > 0: the first two samples, labelled under Bradley–Terry,
    P(a ≻ b) = σ((r_a − r_b) / temperature). 0: the best and worst finished samples by the oracle,
    dropped when they tie. Unfinished samples cannot be encoded as whole responses and are skipped.
    """
    task, data = config.task, TASK_DATA[config.task.get("name", "builtin")]
    prompts = _task_prompts(config, split, n, seed)
    k, temperature = int(task.get("pair_samples", 2)), float(task.label_temperature)
    texts, finished = _sample_texts(model, tokenizer, config, prompts, k, seed)
    rng = np.random.RandomState(seed)
    rows = []
    for i, prompt in enumerate(prompts):
        ok = [j for j in range(i * k, (i + 1) * k) if finished[j] and len(
            tokenizer.encode_response(prompt, texts[j])) <= config.data.max_response_length]
        rewards = {j: data.oracle_reward(prompt, texts[j]) for j in ok}
        if temperature > 0:
            a, b = i * k, i * k + 1
            if a not in rewards or b not in rewards or texts[a] == texts[b]:
                continue  # no preference between identical responses
            a_wins = rng.rand() < 1.0 / (1.0 + np.exp(-(rewards[a] - rewards[b]) / temperature))
            chosen, rejected = (a, b) if a_wins else (b, a)
        else:
            if len(ok) < 2:
                continue
            chosen, rejected = max(ok, key=rewards.get), min(ok, key=rewards.get)
            if rewards[chosen] == rewards[rejected]:
                continue
        rows.append({"prompt": prompt, "chosen": texts[chosen], "rejected": texts[rejected]})
    logging.info("task %s: %d labelled pairs from %d prompts", split, len(rows), n)
    return rows


def _task_prompts(config, split: str, n: int, seed: int) -> list:
    name = config.task.get("name", "builtin")
    return builtin_task.prompts(n, seed=100 + seed) if name == "builtin" else TASK_DATA[name].prompts(
        n, seed=100 + seed, split=split)


def _sample_texts(model, tokenizer, config, prompts, k: int, seed: int) -> tuple[list[str], np.ndarray]:
    """k samples per prompt (prompt-major), ``task.pair_batch`` prompts per call (0: all at once)."""
    ids, mask = pad_left([tokenizer.encode_prompt(p) for p in prompts], config.data.max_prompt_length,
                         tokenizer.pad_id)
    chunk = min(int(config.task.get("pair_batch", 0)) or len(prompts), len(prompts))
    texts, finished = [], []
    for c, start in enumerate(range(0, len(prompts), chunk)):
        idx = np.arange(start, start + chunk) % len(prompts)  # the last chunk wraps: one compiled shape
        keep = min(chunk, len(prompts) - start) * k
        key = jax.random.key(seed) if c == 0 else jax.random.fold_in(jax.random.key(seed), c)
        out = generate(model, ids[idx], mask[idx], key, max_new_tokens=config.data.max_response_length - 1,
                       temperature=float(config.generation.temperature), eos_ids=tokenizer.eos_id, num_samples=k,
                       pad_id=tokenizer.pad_id)
        texts += decode_responses(tokenizer, np.asarray(out.tokens)[:keep], np.asarray(out.mask)[:keep])
        finished.append(np.asarray(out.finished)[:keep])
    return texts, np.concatenate(finished)


def run(config, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    builtin = not config.model.path
    if builtin:
        paths = prepare_task(config, workdir)
        config.model.path, config.data.train_path, config.data.eval_path = paths["model"], paths["train"], paths["eval"]
    validate_online_config(config)
    mesh = make_mesh(dict(config.mesh))
    tokenizer = Tokenizer.from_pretrained(config.model.tokenizer_path or config.model.path)
    d = config.data
    encoded, records = {}, {}
    for split, kind in (("train", "preference"), ("eval", d.get("eval_kind", "preference"))):
        records[split] = load_records(d, split, kind)
        encoded[split] = encode_online(records[split], tokenizer, max_prompt_length=d.max_prompt_length,
                                       max_response_length=d.max_response_length, on_error=d.get("on_error", "raise"),
                                       prompts_only=kind == "prompt")
    eval_prompts = [records["eval"].rows[i]["prompt"] for i in encoded["eval"].arrays["index"]]
    model = load_pretrained(config.model.path, **model_options(config.model), shardings=sharding_fn(mesh))
    reward_source = make_reward_source(config.reward)
    eval_reward_source = make_eval_reward_source(config.reward)
    loop = OnlineLoop(
        config, model=model, tokenizer=tokenizer, mesh=mesh, workdir=workdir,
        # The whole global batch on every process: labelling is replicated, each process trains on its rows.
        prompt_iterator=train_iterator(encoded["train"].arrays, config.batch_size, seed=config.seed),
        train_prompts=[r["prompt"] for r in records["train"].rows], reward_source=reward_source,
        eval_reward_source=eval_reward_source,
        evaluator_args={"prompts": eval_prompts, "eval_arrays": encoded["eval"].arrays,
                        "batch_size": config.eval_batch_size})
    initial, final = loop.run()
    summary = {"variant": config.get("variant", ""), "steps": config.steps,
               "reference": {k: initial[k] for k in ("reward", "score", "finished", "win_rate", "kl", "distinct_2")},
               "final": {k: final[k] for k in ("reward", "score", "finished", "win_rate", "kl", "distinct_2",
                                               "heldout/rewards/accuracies") if k in final},
               "train_seconds": loop.seconds["steps"],
               "generation_share": loop.seconds["generation"] / max(loop.seconds["steps"], 1e-9)}
    save_pretrained(loop.export_model(), os.path.join(workdir, "export"), tokenizer=tokenizer)  # collective
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        _plot(workdir)
        print("\n" + summary_text(summary, loop.evaluator.sample_table(), builtin))
    return summary


def summary_text(summary, samples, builtin: bool) -> str:
    """The block the main job prints (and README quotes): reference vs final policy, then samples."""
    name = summary["variant"] or "policy"
    rows = [("SFT / reference", summary["reference"]), (f"{name} (final)", summary["final"])]
    lines = [f"{'':<24} {'reward':>7} {'win rate vs SFT':>16} {'KL(π‖π_ref)':>12} {'distinct-2':>11}"]
    for label, m in rows:
        lines.append(f"{label:<24} {m['reward']:>7.3f} {m['win_rate']:>16.3f} {m['kl']:>12.3f} "
                     f"{m['distinct_2']:>11.3f}")
    lines += ["", "samples (reference → policy, with " + ("oracle" if builtin else "reward") + " scores):"]
    for prompt, ref, r_ref, pol, r_pol in samples:
        lines.append(f"  {prompt!s:<32} {ref!r} ({r_ref:+.2f}) → {pol!r} ({r_pol:+.2f})")
    return "\n".join(lines)


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
