"""A task's files for the online loop: its starting policy, an oracle-labelled offline preference set
sampled from that policy, and a held-out set, built once in ``task.dir`` and reused."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from sail_jax.errors import UserError
from sail_jax.evaluate import decode_responses
from sail_jax.models import load_pretrained
from sail_jax.progress import bar, say
from sail_jax.sampling import generate
from sail_jax.tasks import get_task
from sail_jax.tokenization import Tokenizer, pad_left


def write_jsonl(path: str, rows) -> str:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)  # complete or absent: a crash never leaves half a file
    return path


def prepare_task(config, workdir: str) -> dict[str, str]:
    """Build (or reuse) the files of ``config.task.name``: the policy folder, the training set (the
    offline preference pairs, or with ``data.train_kind=prompt`` every prompt they were sampled for),
    and the held-out set (pairs, or prompts alone when ``data.eval_kind`` is ``prompt``). Keys left unset
    take the task's values (``configs.fill_defaults``), whoever calls this first (a sweep builds the task
    before any run validates its config)."""
    from sail_jax.configs import fill_defaults

    fill_defaults(config)
    task = get_task(config.task.get("name", "builtin"))
    root = os.path.abspath(config.task.dir or os.path.join(workdir, "task"))
    kinds = {split: config.data.get(f"{split}_kind", "preference") for split in ("train", "eval")}
    paths = {split: os.path.join(root, f"{'preferences' if kind == 'preference' else 'prompts'}_{split}.jsonl")
             for split, kind in kinds.items()}
    model_config = os.path.join(root, task.MODEL_DIR, "config.json")
    if jax.process_count() > 1 and not all(map(os.path.exists, [model_config, *paths.values()])):
        raise UserError(f"task files in {root} are missing and a multi-process run cannot build them: build them "
                        "once with `sail-jax task` (same config, one process) and copy them to every host, or use "
                        "tpu_scripts/launch.sh --task_bucket, which does both")
    if not all(map(os.path.exists, [model_config, *paths.values()])):
        say(f"building the {config.task.get('name', 'builtin')} task in {root} (once; later runs reuse it)")
    paths["model"] = task.build_policy(config, root)
    for split in ("train", "eval"):
        if os.path.exists(paths[split]):
            continue  # each file is written whole or not at all (see write_jsonl)
        n, seed = (config.task.preference_train, 1) if split == "train" else (config.task.preference_eval, 2)
        say(f"task: {'held-out' if split == 'eval' else 'training'} set from {n} prompts")
        if kinds[split] == "prompt":
            rows = [{"prompt": p} for p in task.prompts(n, seed=100 + seed, split=split)]
        else:
            rows = oracle_labelled_pairs(load_pretrained(paths["model"]), Tokenizer.from_pretrained(paths["model"]),
                                          config, split, n, seed)
        write_jsonl(paths[split], rows)
    return paths


def oracle_labelled_pairs(model, tokenizer, config, split: str, n: int, seed: int) -> list[dict]:
    """``task.pair_samples`` samples of the policy per prompt, turned into (at most) one labelled pair.

    ``task.label_temperature`` > 0: the first two samples, labelled under Bradley–Terry,
    P(a ≻ b) = σ((r_a − r_b) / temperature). 0: the best and worst finished samples by the oracle,
    dropped when they tie. Unfinished samples cannot be encoded as whole responses, and empty ones
    are not data (records reject empty strings): both are skipped.
    """
    task, data = config.task, get_task(config.task.get("name", "builtin"))
    prompts = data.prompts(n, seed=100 + seed, split=split)
    k, temperature = int(task.get("pair_samples", 2)), float(task.label_temperature)
    texts, finished = sample_texts(model, tokenizer, config, prompts, k, seed)
    rng = np.random.RandomState(seed)
    rows = []
    for i, prompt in enumerate(prompts):
        ok = [j for j in range(i * k, (i + 1) * k) if finished[j] and texts[j].strip() and len(
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
    say(f"task: {len(rows)} oracle-labelled {split} pairs from {n} prompts")
    return rows


def sample_texts(model, tokenizer, config, prompts, k: int, seed: int) -> tuple[list[str], np.ndarray]:
    """k samples per prompt (prompt-major), ``task.pair_batch`` prompts per call (0: all at once)."""
    ids, mask = pad_left([tokenizer.encode_prompt(p) for p in prompts], config.data.max_prompt_length,
                         tokenizer.pad_id)
    chunk = min(int(config.task.get("pair_batch", 0)) or len(prompts), len(prompts))
    texts, finished = [], []
    starts = range(0, len(prompts), chunk)
    for c, start in enumerate(bar(starts, f"sampling {k} responses for each of {len(prompts)} prompts")):
        idx = np.arange(start, start + chunk) % len(prompts)  # the last chunk wraps: one compiled shape
        keep = min(chunk, len(prompts) - start) * k
        key = jax.random.key(seed) if c == 0 else jax.random.fold_in(jax.random.key(seed), c)
        out = generate(model, ids[idx], mask[idx], key, max_new_tokens=config.data.max_response_length - 1,
                       temperature=float(config.generation.temperature), eos_ids=tokenizer.eos_id, num_samples=k,
                       pad_id=tokenizer.pad_id)
        texts += decode_responses(tokenizer, np.asarray(out.tokens)[:keep], np.asarray(out.mask)[:keep])
        finished.append(np.asarray(out.finished)[:keep])
    return texts, np.concatenate(finished)
