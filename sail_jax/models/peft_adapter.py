"""LoRA adapters in and out as PEFT folders (``adapter_config.json`` + ``adapter_model.safetensors``).

``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)`` loads what
``save_adapter`` writes, and ``load_adapter`` reads what peft's ``save_pretrained`` writes, so a run
can start from, or hand over to, the PyTorch tooling. PEFT stores ``lora_A.weight: [r, in]`` and
``lora_B.weight: [out, r]`` under ``base_model.model.<module path>``; our ``A: [*in, r]`` and
``B: [r, *out]`` keep the heads axis, so the conversion is a reshape and a transpose. The options
PEFT has that change the arithmetic (rsLoRA, DoRA, per-module ranks, ``fan_in_fan_out``, trained
biases) are refused by name rather than read wrongly.
"""

from __future__ import annotations

import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from sail_jax.errors import UserError
from sail_jax.locations import local_folder
from sail_jax.models.lora import adapted_layers, add_lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT options whose non-default values change what the weights mean.
_UNSUPPORTED = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
                "rank_pattern": {}, "alpha_pattern": {}}


class AdapterError(UserError, ValueError):
    pass


def _module_names(model) -> dict[str, object]:
    return dict(adapted_layers(model, r""))


def save_adapter(model, path: str, *, base_model: str = "", dropout: float = 0.0) -> None:
    """Write ``model``'s adapters as a PEFT folder (every process calls it; process 0 writes).
    A reward model's score head, which trains beside the adapters, goes in as ``modules_to_save``."""
    from sail_jax.distributed import is_main, to_host
    from sail_jax.models.transformer import RewardModel

    layers = [(name, layer) for name, layer in adapted_layers(model, r"") if layer.lora is not None]
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA adapters")
    tensors = {}
    for name, layer in layers:
        a, b = (np.asarray(to_host(x[...]), np.float32) for x in (layer.lora.a, layer.lora.b))
        rank = a.shape[-1]
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)  # [r, in]
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)  # [out, r]
    reward = isinstance(model, RewardModel)
    if reward:
        tensors[f"{_PREFIX}score.weight"] = np.ascontiguousarray(
            np.asarray(to_host(model.score.kernel[...]), np.float32).T)  # [num_labels, d]
    if not is_main():
        return
    first = layers[0][1].lora
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if reward else "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": int(first.a.shape[-1]), "lora_alpha": float(first.scale * first.a.shape[-1]), "lora_dropout": dropout,
        "target_modules": _target_modules(model, [name for name, _ in layers]),
        "modules_to_save": ["score"] if reward else None, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, **_UNSUPPORTED,
    }
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


def _target_modules(model, adapted: list[str]):
    """PEFT's ``target_modules``: the projection names when every projection of those names is adapted
    (the usual case), else a regex matching exactly the adapted module paths."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    every = [name for name in _module_names(model) if name.rsplit(".", 1)[-1] in leaves]
    if sorted(every) == sorted(adapted):
        return leaves
    return "^(" + "|".join(re.escape(name) for name in adapted) + ")$"


def load_adapter(model, path: str, *, rank: int, alpha: float, targets: str, dropout: float = 0.0) -> int:
    """Attach the PEFT adapter in folder ``path`` to ``model`` (in place); returns how many modules.

    The config's ``lora.rank``/``alpha``/``targets`` must describe the folder's adapter (they are what
    the checkpoint and the export record), so a mismatch raises naming the value to set. ``path`` may
    be a Hub id or ``gs://`` path (``sail_jax.locations``)."""
    path = local_folder(path, key="lora.path")
    config_file, weights_file = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for file in (config_file, weights_file):
        if not os.path.exists(file):
            raise AdapterError(f"lora.path={path!r}: no {os.path.basename(file)} there (a PEFT LoRA folder holds "
                               f"{CONFIG_FILE} and {WEIGHTS_FILE}; an adapter_model.bin must be re-saved with "
                               "safe_serialization=True)")
    with open(config_file, encoding="utf-8") as f:
        peft_config = json.load(f)
    if peft_config.get("peft_type") != "LORA":
        raise AdapterError(f"{config_file}: peft_type={peft_config.get('peft_type')!r}; only LoRA adapters load")
    for key, default in _UNSUPPORTED.items():
        if peft_config.get(key, default) not in (default, None):
            raise AdapterError(f"{config_file}: {key}={peft_config[key]!r} is not supported (only {default!r})")
    for key, ours, field in (("r", rank, "rank"), ("lora_alpha", alpha, "alpha")):
        if float(peft_config[key]) != float(ours):
            raise AdapterError(f"config.lora.{field}={ours!r} but {config_file} has {key}={peft_config[key]!r}; "
                               f"set --config.lora.{field}={peft_config[key]!r}")

    with safe_open(weights_file, framework="numpy") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}
    in_file = sorted({k[len(_PREFIX):].rsplit(".lora_", 1)[0] for k in stored if ".lora_" in k})
    ours = [name for name, _ in adapted_layers(model, targets)]
    if sorted(ours) != in_file:
        extra, missing = sorted(set(in_file) - set(ours)), sorted(set(ours) - set(in_file))
        raise AdapterError(f"{weights_file} adapts {len(in_file)} modules, config.lora.targets={targets!r} selects "
                           f"{len(ours)}: only in the file {extra[:4]}, only in the config {missing[:4]}; set "
                           "config.lora.targets to select the file's modules")
    count = add_lora(model, rank=rank, alpha=alpha, targets=targets, dropout=dropout)
    for name, layer in adapted_layers(model, targets):
        a_key, b_key = f"{_PREFIX}{name}.lora_A.weight", f"{_PREFIX}{name}.lora_B.weight"
        a, b = stored[a_key], stored[b_key]
        n_in, n_out = math.prod(layer.in_shape), math.prod(layer.out_shape)
        for key, value, want in ((a_key, a, (rank, n_in)), (b_key, b, (n_out, rank))):
            if tuple(value.shape) != want:
                raise AdapterError(f"{weights_file}: {key} has shape {tuple(value.shape)}, this model needs {want}")
        layer.lora.a[...] = jnp.asarray(a.T.reshape(*layer.in_shape, rank), jnp.float32)
        layer.lora.b[...] = jnp.asarray(b.T.reshape(rank, *layer.out_shape), jnp.float32)
    head = stored.get(f"{_PREFIX}score.weight")
    if head is not None and getattr(model, "score", None) is not None:  # a reward model's trained head
        kernel = model.score.kernel
        if tuple(head.shape) != tuple(kernel.shape[::-1]):
            raise AdapterError(f"{weights_file}: score.weight has shape {tuple(head.shape)}, this model needs "
                               f"{tuple(kernel.shape[::-1])}")
        kernel[...] = jnp.asarray(head.T, kernel.dtype)
    return count
