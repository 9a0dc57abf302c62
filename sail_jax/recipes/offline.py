"""Offline recipes on one loop: SFT, reward-model training, and offline DPO (any ``loss_type``).

    sail-jax --config=configs/dpo.py --workdir=runs/dpo --config.model.path=... --config.data.train_path=...

The loop: validate the config -> mesh -> tokenizer and data -> model (loaded straight onto the mesh)
-> optimizer -> resume from the workdir's last checkpoint if any -> jitted steps with periodic
logging, evaluation and checkpoints -> export an HF folder (model + tokenizer) to ``workdir/export``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from sail_jax.configs import model_options
from sail_jax.data.buckets import Buckets, ShapeLog
from sail_jax.data.pipeline import (Encoded, encode_preference, encode_sft, eval_batches, has_eval_set, load_records,
                                    train_iterator)
from sail_jax.driver import drive
from sail_jax.models import load_pretrained
from sail_jax.objectives import make_dpo_objective, reference_logps, reward_objective, sft_objective
from sail_jax.optim import make_optimizer
from sail_jax.progress import say
from sail_jax.reference_cache import attach_reference_logps
from sail_jax.sharding import data_parallel_size, make_mesh, param_shardings, shard_batch, sharding_fn
from sail_jax.tokenization import Tokenizer
from sail_jax.train import checkpoint_dir, make_eval_step, make_train_step, mean_metrics
from sail_jax.trainable import Trainable, export_policy, prepare
from sail_jax.validation import validate_training_config
from sail_jax.workdir import write_summary


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
    for unread in ("prompt_ids", "prompt_mask"):  # for sampling; no offline step reads them (one width less)
        enc.arrays.pop(unread, None)
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
        attach_reference_logps(enc.arrays, lambda batch: fn(ref_params, batch), batch_size=config.eval_batch_size,
                               mesh=mesh, cache_path=os.path.join(workdir, f"reference_logps_{name}.npz"),
                               desc=f"reference log-probs ({name})", buckets=Buckets.from_config(config.data))


@dataclasses.dataclass
class OfflineTrainer:
    """What ``drive`` needs of an offline recipe: the state, a step on the next batch, an evaluation."""

    state: Any
    shardings: Any
    batches: Any  # grain iterator (its position is checkpointed)
    mesh: Any
    train_step: Callable
    evaluate: Callable[[], dict[str, float]]
    trainable: Trainable
    checkpoint_directory: str = ""
    shapes: ShapeLog = dataclasses.field(default_factory=ShapeLog)

    def step(self, step: int) -> dict:
        batch = next(self.batches)
        batch_metrics = self.shapes.metrics(batch)
        self.state, metrics = self.train_step(self.state, shard_batch(batch, self.mesh))
        return {**metrics, **batch_metrics}

    def checkpoint_extra(self) -> dict:
        return {"data": self.batches.get_state(), **self.trainable.checkpoint_extra()}

    def load_extra(self, extra: dict) -> None:
        self.trainable.check_checkpoint(extra, self.checkpoint_directory)
        self.batches.set_state(extra["data"])


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
    say(f"{config.recipe}: loading the data and the model ({config.model.path})")
    tokenizer = Tokenizer.from_pretrained(config.model.tokenizer_path or config.model.path)
    train_data = _encode(config, recipe, tokenizer, "train")
    eval_data = _encode(config, recipe, tokenizer, "eval") if has_eval_set(config.data) else None

    model = load_pretrained(config.model.path, **model_options(config.model), shardings=sharding_fn(mesh),
                            task=recipe.model_task, head_seed=config.seed)
    tx = make_optimizer(config.optim, config.steps)
    trainable, state, shardings = prepare(model, tx, mesh, config.lora, seed=config.seed)
    del model

    objective, extra, extra_shardings = _objective(config, workdir, trainable, state, shardings, mesh,
                                                   {"train": train_data, "eval": eval_data})
    graphdef = trainable.graphdef
    frozen, frozen_shardings = {**trainable.frozen, **extra}, {**trainable.frozen_shardings, **extra_shardings}
    train_step = make_train_step(graphdef, tx, objective, mesh, shardings, frozen_shardings, seed=config.seed)
    eval_step = make_eval_step(graphdef, objective, mesh, shardings.params, frozen_shardings, seed=config.seed)

    processes, index = jax.process_count(), jax.process_index()
    d, buckets = config.data, Buckets.from_config(config.data)
    batches = train_iterator(train_data.arrays, config.batch_size // processes, seed=config.seed,
                             process_index=index, process_count=processes, buckets=buckets, shuffle=d.shuffle,
                             group_by_length=d.group_by_length, group_window=d.group_window, packing=d.packing,
                             row_multiple=data_parallel_size(mesh))
    eval_set = (eval_batches(eval_data.arrays, config.eval_batch_size // processes, process_index=index,
                             process_count=processes, buckets=buckets) if eval_data else [])
    trainer = OfflineTrainer(state, shardings, batches, mesh, lambda s, b: train_step(s, b, frozen),
                             lambda: evaluate(eval_step, trainer.state.params, frozen, eval_set, mesh), trainable,
                             checkpoint_dir(config, workdir))
    skipped = {"train": train_data.skipped, "eval": eval_data.skipped if eval_data else 0}
    final = drive(trainer, config, workdir, desc=config.recipe,
                  step0={"data": {f"skipped/{k}": float(v) for k, v in skipped.items()}})
    export = os.path.join(workdir, "export") if config.get("export", True) else None
    if export:  # every process: sharded parameters are gathered collectively
        export_policy(config, trainable, trainer.state.params, workdir, tokenizer)
    if jax.process_index() == 0:
        text = summary_text(config.recipe, int(config.steps), final, skipped, export)
        write_summary(workdir, {"recipe": config.recipe, "steps": int(config.steps), "final": final,
                                "skipped_rows": skipped, "export": export}, text)
        print("\n" + text)
    return final


def summary_text(recipe: str, steps: int, final: dict[str, float], skipped: dict[str, int], export: str | None) -> str:
    """What an offline run prints at the end (and a rerun of the finished run prints again)."""
    lines = [f"{recipe}: {steps} steps done."]
    if final:
        lines.append("held-out: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(final.items())))
    if any(skipped.values()):
        lines.append("skipped rows (data.on_error=skip): " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    lines.append(f"exported to {export}" if export else "not exported (config.export=False)")
    return "\n".join(lines)


def _objective(config, workdir, trainable: Trainable, state, shardings, mesh, datasets):
    """The recipe's loss and its read-only inputs (the reference model for DPO: by default the initial
    policy, which with LoRA is the frozen base itself, not a copy)."""
    if config.recipe == "sft":
        return sft_objective, {}, {}
    if config.recipe == "reward":
        return reward_objective, {}, {}
    mode = _reference_mode(config)
    objective = make_dpo_objective(config.loss, trainable.base_graphdef, mode)
    if mode == "none":
        return objective, {}, {}
    if config.reference.path:
        reference = load_pretrained(config.reference.path, jnp.dtype(config.model.dtype),
                                    param_dtype=config.model.get("param_dtype") or None, shardings=sharding_fn(mesh))
        ref_params = nnx.state(reference)
    else:
        ref_params = trainable.reference(state.params, shardings.params)[1]
    if mode == "cached":
        _precompute_reference(config, workdir, trainable.base_graphdef, ref_params, mesh,
                              {k: v for k, v in datasets.items() if v is not None})
        return objective, {}, {}
    return objective, {"reference": ref_params}, {"reference": param_shardings(ref_params, mesh)}
