"""Offline recipes on one loop: SFT, reward-model training, and offline DPO (any ``loss_type``).

    sail-jax --config=configs/dpo.py --workdir=runs/dpo --config.model.path=... --config.data.train_path=...

The loop: validate the config -> mesh -> tokenizer and data -> model (loaded straight onto the mesh)
-> optimizer -> resume from the workdir's last checkpoint if any -> jitted steps with periodic
logging, evaluation and checkpoints -> export an HF folder (model + tokenizer) to ``workdir/export``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from sail_jax.configs import model_options
from sail_jax.data.pipeline import Encoded, encode_preference, encode_sft, eval_batches, load_records, train_iterator
from sail_jax.models import load_pretrained, save_pretrained
from sail_jax.objectives import make_dpo_objective, reference_logps, reward_objective, sft_objective
from sail_jax.optim import make_optimizer
from sail_jax.sharding import make_mesh, shard_batch, sharding_fn
from sail_jax.tokenization import Tokenizer
from sail_jax.train import (Checkpoints, MetricLogger, abstract_like, checkpoint_dir, create_train_state, frozen_copy,
                            make_eval_step, make_train_step, mean_metrics)
from sail_jax.validation import validate_training_config


@dataclasses.dataclass(frozen=True)
class Recipe:
    kind: str  # record kind the data must have
    model_task: str  # causal_lm | sequence_classification
    encode: Callable[..., Encoded]


RECIPES = {
    "sft": Recipe("sft", "causal_lm", encode_sft),
    "reward": Recipe("preference", "sequence_classification", encode_preference),
    "dpo": Recipe("preference", "causal_lm", encode_preference),
}


def _encode(config, recipe: Recipe, tokenizer: Tokenizer, split: str) -> Encoded:
    d = config.data
    enc = recipe.encode(load_records(d, split, recipe.kind), tokenizer, max_prompt_length=d.max_prompt_length,
                        max_length=d.max_length, on_error=d.get("on_error", "raise"))
    if enc.skipped:
        logging.warning("data (%s): %d records skipped in total (malformed or too long)", split, enc.skipped)
    return enc


def _reference_mode(config) -> str:
    if config.reference.get("free", False):
        return "none"
    return "cached" if config.reference.get("precompute", False) else "model"


def _precompute_reference(config, workdir, graphdef, ref_params, mesh, datasets):
    """Reference log-probs of every row, computed once and cached in the workdir."""
    fn = jax.jit(lambda params, batch: reference_logps(graphdef, params, batch))
    for name, enc in datasets.items():
        cache = os.path.join(workdir, f"reference_logps_{name}.npz")
        n = len(enc)
        if os.path.exists(cache):
            with np.load(cache) as f:
                if len(f["chosen"]) == n:
                    enc.arrays["ref_chosen_logps"], enc.arrays["ref_rejected_logps"] = f["chosen"], f["rejected"]
                    continue
        chosen, rejected = [], []
        for batch in eval_batches(enc.arrays, config.eval_batch_size):
            c, r = fn(ref_params, shard_batch(batch, mesh))
            chosen.append(np.asarray(c))
            rejected.append(np.asarray(r))
        enc.arrays["ref_chosen_logps"] = np.concatenate(chosen)[:n]
        enc.arrays["ref_rejected_logps"] = np.concatenate(rejected)[:n]
        if jax.process_index() == 0:
            np.savez(cache, chosen=enc.arrays["ref_chosen_logps"], rejected=enc.arrays["ref_rejected_logps"])


def evaluate(eval_step, params, frozen, batches, mesh) -> dict[str, float]:
    outs, weights = [], []
    for batch in batches:
        outs.append(eval_step(params, shard_batch(batch, mesh), frozen))
        weights.append(float(batch["valid"].sum()))
    return mean_metrics(outs, weights)


def run(config, workdir: str) -> dict[str, float]:
    recipe = RECIPES[config.recipe]
    validate_training_config(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(dict(config.mesh))
    tokenizer = Tokenizer.from_pretrained(config.model.tokenizer_path or config.model.path)
    train_data = _encode(config, recipe, tokenizer, "train")
    eval_data = _encode(config, recipe, tokenizer, "eval") if _has_eval(config) else None

    model = load_pretrained(config.model.path, **model_options(config.model), shardings=sharding_fn(mesh),
                            task=recipe.model_task, head_seed=config.seed)
    tx = make_optimizer(config.optim, config.steps)
    graphdef, state, shardings = create_train_state(model, tx, mesh)
    del model

    objective, frozen, frozen_shardings = _objective(config, workdir, graphdef, state, shardings, mesh,
                                                     {"train": train_data, "eval": eval_data})
    train_step = make_train_step(graphdef, tx, objective, mesh, shardings, frozen_shardings, seed=config.seed)
    eval_step = make_eval_step(graphdef, objective, mesh, shardings.params, frozen_shardings, seed=config.seed)

    processes, index = jax.process_count(), jax.process_index()
    batches = train_iterator(train_data.arrays, config.batch_size // processes, seed=config.seed,
                             process_index=index, process_count=processes)
    eval_set = (eval_batches(eval_data.arrays, config.eval_batch_size // processes, process_index=index,
                             process_count=processes) if eval_data else [])
    ckpt = Checkpoints(checkpoint_dir(config, workdir), every=config.checkpoint.every,
                       keep=config.checkpoint.keep, async_save=config.checkpoint.get("async_save", True))
    restored = ckpt.restore(abstract_like(state, shardings))
    if restored is not None:
        state, extra = restored
        batches.set_state(extra["data"])
        logging.info("resumed from step %d", int(state.step))
    start = int(state.step)
    logger = MetricLogger(workdir, start_step=start)
    final: dict[str, float] = {}
    bar = tqdm(total=config.steps, initial=start, disable=index != 0, desc=config.recipe, dynamic_ncols=True)
    t0 = time.time()
    for step in range(start, config.steps):
        state, metrics = train_step(state, shard_batch(next(batches), mesh), frozen)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            values = logger.write(done, {**metrics, "steps_per_second": (done - start) / (time.time() - t0)})
            bar.set_postfix(loss=f"{values['loss']:.4f}")
        if eval_set and (done % config.eval_every == 0 or done == config.steps):
            final = logger.write(done, evaluate(eval_step, state.params, frozen, eval_set, mesh), split="eval")
        ckpt.maybe_save(done, state, {"data": batches.get_state()}, force=done == config.steps)
        bar.update(1)
    bar.close()
    ckpt.close()
    logger.close()
    if config.get("export", True):  # every process: sharded parameters are gathered collectively
        export = os.path.join(workdir, "export")
        save_pretrained(nnx.merge(graphdef, state.params), export, tokenizer=tokenizer)
        logging.info("exported the trained model to %s", export)
    return final


def _has_eval(config) -> bool:
    d = config.data
    return bool(d.eval_path) if d.source == "jsonl" else bool(d.get("eval_split"))


def _objective(config, workdir, graphdef, state, shardings, mesh, datasets):
    """The recipe's loss and its read-only inputs (the reference model for DPO)."""
    if config.recipe == "sft":
        return sft_objective, {}, {}
    if config.recipe == "reward":
        return reward_objective, {}, {}
    mode = _reference_mode(config)
    objective = make_dpo_objective(config.loss, graphdef, mode)
    if mode == "none":
        return objective, {}, {}
    if config.reference.path:
        reference = load_pretrained(config.reference.path, jnp.dtype(config.model.dtype),
                                    param_dtype=config.model.get("param_dtype") or None, shardings=sharding_fn(mesh))
        ref_params = nnx.state(reference)
    else:
        ref_params = frozen_copy(state.params, shardings.params)  # the initial policy
    if mode == "cached":
        _precompute_reference(config, workdir, graphdef, ref_params, mesh,
                              {k: v for k, v in datasets.items() if v is not None})
        return objective, {}, {}
    return objective, {"reference": ref_params}, {"reference": shardings.params}
