"""What a run trains and what it holds frozen: every parameter, or LoRA adapters over a frozen base.

Full training keeps the policy's parameters in the train state and, where a reference is needed, a
copy of the initial ones. With LoRA (``config.lora.rank > 0``) the train state holds the adapters
only, the base travels to every step as ``frozen["base"]``, and the reference *is* that base with
the adapters off: one copy of the base weights serves policy and reference. The recipes and the
online loop ask a ``Trainable`` for the policy model, the reference and the export, and never
branch on LoRA themselves.

A LoRA checkpoint holds adapters and optimizer state only, so it records a fingerprint of the base it
was trained on; resuming on another base raises instead of silently training a mismatched pair.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sail_jax.models.lora import add_lora, merge_lora
from sail_jax.models.hf import save_pretrained
from sail_jax.models.quantize import quantize_model
from sail_jax.models.peft_adapter import load_adapter, save_adapter
from sail_jax.models.transformer import RewardModel
from sail_jax.train import CheckpointError, create_adapter_train_state, create_train_state, frozen_copy, policy


@dataclasses.dataclass(frozen=True)
class Trainable:
    graphdef: Any  # the policy's graph (with LoRA: adapters attached)
    base_graphdef: Any  # the model without adapters (with LoRA: the reference's graph)
    frozen: dict  # {"base": frozen base parameters} with LoRA, else {}
    frozen_shardings: dict

    @property
    def lora(self) -> bool:
        return "base" in self.frozen

    def states(self, params) -> tuple:
        """What ``nnx.merge(graphdef, *states)`` needs for the policy of these trained parameters."""
        return (params, self.frozen["base"]) if self.lora else (params,)

    def model(self, params) -> nnx.Module:
        return policy(self.graphdef, params, self.frozen)

    def reference(self, params, shardings) -> tuple[Any, Any]:
        """``(graphdef, parameters)`` of the initial policy: with LoRA the base itself (no copy), else a
        copy of ``params`` (the train state is donated, so the reference must not share its buffers)."""
        if self.lora:
            return self.base_graphdef, self.frozen["base"]
        return self.graphdef, frozen_copy(params, shardings)

    def export_model(self, params) -> nnx.Module:
        """The policy as one plain model (adapters merged into the kernels): what ``export/`` holds. A copy:
        merging must not write into the live base."""
        return merge_lora(nnx.merge(self.graphdef, *self.states(params), copy=True))

    def checkpoint_extra(self) -> dict:
        return {"base_fingerprint": base_fingerprint(self.frozen["base"])} if self.lora else {}

    def check_checkpoint(self, extra: dict, directory: str) -> None:
        """A LoRA checkpoint resumes only on the base it was trained on."""
        if not self.lora:
            return
        saved, ours = extra.get("base_fingerprint"), base_fingerprint(self.frozen["base"])
        if saved != ours:
            raise CheckpointError(
                f"the checkpoint in {directory} holds LoRA adapters trained on a different base model "
                f"(base fingerprint {saved}, this run's model.path gives {ours}). Resume with the model.path "
                "it was trained on, or start in a new workdir.")


def export_policy(config, trainable: Trainable, params, workdir: str, tokenizer) -> None:
    """``WORKDIR/export/``: the policy as a full HF model; with LoRA also ``WORKDIR/export_adapter/``, the
    adapters alone as a PEFT folder for the base at ``model.path``. Every process calls it (collective)."""
    save_pretrained(trainable.export_model(params), os.path.join(workdir, "export"), tokenizer=tokenizer)
    if trainable.lora:
        save_adapter(trainable.model(params), os.path.join(workdir, "export_adapter"), base_model=config.model.path,
                     dropout=float(config.lora.dropout))


def prepare(model: nnx.Module, tx, mesh, lora_config, *, seed: int):
    """``(Trainable, state, shardings)`` for ``model`` (consumed: its arrays move into the state).

    ``lora_config`` is ``config.lora``: rank 0 trains every parameter; otherwise adapters are attached
    (``attach_lora``) and only they train."""
    if not int(lora_config.rank):
        base_graphdef = nnx.graphdef(model)
        graphdef, state, shardings = create_train_state(model, tx, mesh)
        return Trainable(graphdef, base_graphdef, {}, {}), state, shardings
    base_graphdef = attach_lora(model, lora_config, seed=seed)
    # A reward model's score head is new (not part of the base), so it trains beside the adapters.
    trainable = nnx.Any(nnx.LoRAParam, nnx.PathContains("score")) if isinstance(model, RewardModel) else nnx.LoRAParam
    graphdef, state, shardings, base, base_shardings = create_adapter_train_state(model, tx, mesh, trainable)
    return Trainable(graphdef, base_graphdef, {"base": base}, {"base": base_shardings}), state, shardings


def attach_lora(model: nnx.Module, lora_config, *, seed: int):
    """Quantize the base when ``lora.quantize`` asks (QLoRA), then attach adapters, fresh or read from the
    PEFT folder ``lora.path`` (in place). Returns the base's graph: the model with the adapters off,
    which is the reference."""
    if lora_config.get("quantize"):
        quantize_model(model, lora_config["quantize"])
    base_graphdef = nnx.graphdef(model)
    kwargs = dict(rank=int(lora_config["rank"]), alpha=float(lora_config["alpha"]), targets=lora_config["targets"],
                  dropout=float(lora_config["dropout"]))
    if lora_config.get("path"):
        load_adapter(model, lora_config["path"], **kwargs)
    else:
        add_lora(model, **kwargs, seed=seed)
    return base_graphdef


@jax.jit
def _leaf_hashes(tree):
    """Per leaf, ``Σ bits(x_i)·(i mod 65521 + 1)`` in wrapping uint32 arithmetic over the raw bit patterns:
    exact and independent of reduction order (so of the mesh), and sensitive to moved values."""

    def one(x):
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize, jnp.uint32)
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
        weights = jax.lax.iota(jnp.uint32, bits.size) % jnp.uint32(65521) + jnp.uint32(1)
        return jnp.sum(bits * weights, dtype=jnp.uint32)

    return jax.tree.map(one, tree)


def base_fingerprint(base) -> str:
    """A short hex digest of the base's paths, shapes, dtypes and exact values."""
    hashes = jax.device_get(_leaf_hashes(base))
    h = hashlib.sha256()
    for path, value in jax.tree_util.tree_leaves_with_path(hashes):
        h.update(f"{jax.tree_util.keystr(path)}={int(np.asarray(value))};".encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(base):
        h.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype};".encode())
    return h.hexdigest()[:16]
