"""Hugging Face checkpoints in and out: ``config.json`` + safetensors (single file or sharded).

Loading builds the model abstractly (``nnx.eval_shape``), then reads one tensor at a time and places
it directly on its device / sharding, so a large checkpoint is never materialised twice in memory.
Every mismatch between checkpoint and architecture is reported by tensor name before anything loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from sail_jax.locations import local_folder
from sail_jax.models.config import ModelConfig
from sail_jax.models.transformer import CausalLM, Linear, RewardModel, RMSNorm, build_model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write that carry no learned state.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# Maps a parameter's dotted path (e.g. "model.layers.0.self_attn.q_proj.kernel") and shape to the
# sharding it should be placed with. The training core derives one from its partition rules.
ShardingFn = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
    """How one HF tensor maps onto one of our parameters."""

    param: nnx.Param
    path: str  # our dotted path
    shape: tuple[int, ...]  # our shape
    hf_shape: tuple[int, ...]
    from_hf: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _tensor_specs(model: CausalLM | RewardModel) -> dict[str, _TensorSpec]:
    """HF tensor name -> spec, derived by walking the module graph."""
    specs: dict[str, _TensorSpec] = {}

    def add(prefix, hf_suffix, param, hf_shape, from_hf, to_hf, our_suffix):
        name = f"{prefix}.{hf_suffix}"
        shape = tuple(param.shape)
        specs[name] = _TensorSpec(param, f"{prefix}.{our_suffix}", shape, tuple(hf_shape), from_hf, to_hf)

    for path, node in nnx.iter_graph(model):
        prefix = ".".join(str(p) for p in path)
        if isinstance(node, Linear):
            shape = tuple(node.kernel.shape)
            n_in = math.prod(shape[: node.n_in])
            n_out = math.prod(shape[node.n_in :])
            add(prefix, "weight", node.kernel, (n_out, n_in),
                lambda w, s=shape: w.T.reshape(s), lambda k, n=n_in: k.reshape(n, -1).T, "kernel")
            if node.bias is not None:
                bshape = tuple(node.bias.shape)
                add(prefix, "bias", node.bias, (n_out,),
                    lambda b, s=bshape: b.reshape(s), lambda b: b.reshape(-1), "bias")
        elif isinstance(node, RMSNorm):
            add(prefix, "weight", node.scale, node.scale.shape, lambda w: w, lambda w: w, "scale")
        elif isinstance(node, nnx.Embed):
            add(prefix, "weight", node.embedding, node.embedding.shape, lambda w: w, lambda w: w, "embedding")
    return specs


def _weight_files(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file holding it."""
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index}: no 'weight_map' entry; is this a safetensors index file?")
        missing = sorted({fn for fn in weight_map.values() if not os.path.exists(os.path.join(path, fn))})
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
        return {name: os.path.join(path, fn) for name, fn in weight_map.items()}
    if os.path.exists(single):
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(
        f"{path}: no {SINGLE_FILE} or {INDEX_FILE}. Only safetensors checkpoints are supported; "
        "re-save a PyTorch .bin checkpoint with `model.save_pretrained(dir, safe_serialization=True)`."
    )


def read_config(path: str, **overrides) -> ModelConfig:
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{config_file} not found: a HF model folder needs config.json")
    with open(config_file) as f:
        return ModelConfig.from_hf_dict(json.load(f), source=config_file, **overrides)


def load_pretrained(
    path: str,
    dtype=jnp.float32,
    *,
    param_dtype=None,
    shardings: ShardingFn | None = None,
    task: str | None = None,
    head_seed: int = 0,
    remat: str = "none",
) -> CausalLM | RewardModel:
    """Load a local HF folder into our model (causal LM or reward model, by its architecture).

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``, or
        a Hub id / ``gs://`` path to one (``sail_jax.locations``).
      dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``).
      param_dtype: storage dtype of the parameters; defaults to ``dtype``.
      shardings: optional ``(param_path, shape) -> Sharding``; each tensor is placed there directly.
      task: ``"sequence_classification"`` turns a causal-LM checkpoint into a reward model (as HF's
        ``AutoModelForSequenceClassification`` does): the LM head is dropped and a new scalar
        ``score`` head is initialised from ``head_seed``. None: the checkpoint's own task.
      remat: activation checkpointing of the decoder layers in training (``models.config.REMAT``: none | dots | full).
    """
    path = local_folder(path)
    dtype_name = jnp.dtype(dtype).name
    config = read_config(path, dtype=dtype_name, param_dtype=jnp.dtype(param_dtype or dtype).name, remat=remat)
    new_heads: set[str] = set()
    if task is not None and task != config.task:
        if (config.task, task) != ("causal_lm", "sequence_classification"):
            raise ValueError(f"{path}: cannot load a {config.task} checkpoint as {task!r}; "
                             "only causal_lm -> sequence_classification (a new reward head) is supported")
        config = dataclasses.replace(config, task=task, num_labels=1)
        new_heads = {"score.weight"}
    model = nnx.eval_shape(lambda: build_model(config))
    specs = _tensor_specs(model)
    files = _weight_files(path)

    present = {n for n in files if not n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings or new_heads:
        present.discard("lm_head.weight")  # tied copy stored by some exporters, or the LM head we replace
    missing = sorted(set(specs) - present - new_heads)
    unexpected = sorted(present - set(specs))
    problems = []
    if missing:
        problems.append(f"missing tensors {_clip(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_clip(unexpected)}")
    shapes = _stored_shapes({n: files[n] for n in specs if n in files})
    wrong = [f"{n}: checkpoint {shapes[n]} != expected {s.hf_shape}" for n, s in specs.items()
             if n in shapes and shapes[n] != s.hf_shape]
    if wrong:
        problems.append(f"mis-shaped tensors [{'; '.join(_clip(wrong))}]")
    if problems:
        raise ValueError(f"{path}: checkpoint does not match {config.architecture}: " + "; ".join(problems))

    np_dtype = jnp.dtype(config.weight_dtype)
    # Stored wider than computed (float32 weights, bfloat16 compute): each weight starts at the value the forward
    # pass uses. A float16 checkpoint puts 1 weight in 8 exactly halfway between two bfloat16 values; any update
    # then moves it a whole bfloat16 step, so SmolLM2's first DPO step at lr 1e-6 cost its log-probs 47 nats.
    snap = jnp.dtype(dtype) if jnp.finfo(jnp.dtype(dtype)).bits < jnp.finfo(np_dtype).bits else None
    for file, names in _group_by_file({n: files[n] for n in specs if n not in new_heads}).items():
        with safe_open(file, framework="numpy") as f:
            for name in names:
                spec = specs[name]
                value = spec.from_hf(f.get_tensor(name))
                value = (value if snap is None else value.astype(snap)).astype(np_dtype)
                if shardings is not None:
                    array = jax.device_put(value, shardings(spec.path, spec.shape))
                else:
                    array = jnp.asarray(value)
                spec.param.set_value(array)
    for name in new_heads:
        spec = specs[name]
        value = 0.02 * jax.random.normal(jax.random.key(head_seed), spec.shape, np_dtype)
        spec.param.set_value(jax.device_put(value, shardings(spec.path, spec.shape)) if shardings else value)
    return model


def save_pretrained(
    model: CausalLM | RewardModel,
    path: str,
    *,
    tokenizer=None,
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    """Write an HF folder (``config.json`` + safetensors, sharded above ``max_shard_bytes``).

    ``transformers.AutoModelForCausalLM`` / ``AutoModelForSequenceClassification`` load it as is.
    In a multi-process run every process must call this (parameters sharded across processes are
    gathered collectively); only process 0 writes.
    """
    from sail_jax.distributed import is_main, to_host

    tensors = {name: np.ascontiguousarray(spec.to_hf(np.asarray(to_host(spec.param[...]))))
               for name, spec in _tensor_specs(model).items()}
    if not is_main():
        return
    os.makedirs(path, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE_FILE), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, fn), metadata=metadata)
            weight_map.update({name: fn for name in shard})
        total = sum(v.nbytes for v in tensors.values())
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_hf_dict(), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _stored_shapes(files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file, names in _group_by_file(files).items():
        with safe_open(file, framework="numpy") as f:
            for name in names:
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _group_by_file(files: dict[str, str]) -> dict[str, list[str]]:
    """Tensor -> file becomes file -> tensors, so each file is opened once."""
    by_file: dict[str, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    return by_file


def _clip(items: list[str], limit: int = 10) -> list[str]:
    return items if len(items) <= limit else items[:limit] + [f"... ({len(items) - limit} more)"]
