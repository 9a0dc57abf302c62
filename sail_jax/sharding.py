"""Device mesh and the one table of partition rules.

Every array placement in sail-jax comes from here: the mesh has three named axes,

  ``data``   pure data parallelism (parameters replicated),
  ``fsdp``   data parallelism whose replicas also split parameters and optimizer state (ZeRO-3),
  ``tensor`` tensor parallelism (attention heads and the MLP hidden dimension are split),

and ``PARTITION_RULES`` maps parameter paths to ``PartitionSpec``s over them. Batches put their
leading axis over ``("data", "fsdp")``. A single CPU is the same code with a 1x1x1 mesh.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
import optax
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Parameter path (dotted, e.g. "model.layers.0.self_attn.q_proj.kernel") -> spec, first match wins.
# Kernels keep heads as their own axis (q_proj: [d, heads, head_dim]; o_proj: [heads, head_dim, d]).
# A quantized kernel's codes (sail_jax.models.quantize) take the kernel's rule. Its scales have the
# kernel's rank with the input axis cut to blocks (NF4: d / 64, int8: 1), which FSDP often does not
# divide, so where that axis carries fsdp the scales split their output axis over it instead.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"(q_proj|k_proj|v_proj)\.kernel_scale$", P(None, "tensor", "fsdp")),  # [d / 64, heads, head_dim]
    (r"(gate_proj|up_proj)\.kernel_scale$", P(None, ("tensor", "fsdp"))),  # [d / 64, ffn]
    (r"embed_tokens\.embedding$", P("tensor", "fsdp")),  # [vocab, d]
    (r"(q_proj|k_proj|v_proj)\.kernel$", P("fsdp", "tensor", None)),  # [d, heads, head_dim]
    (r"(q_proj|k_proj|v_proj)\.bias$", P("tensor", "fsdp")),  # [heads, head_dim]
    (r"o_proj\.kernel(_scale)?$", P("tensor", None, "fsdp")),  # [heads, head_dim, d]
    (r"(gate_proj|up_proj)\.kernel$", P("fsdp", "tensor")),  # [d, ffn]
    (r"(gate_proj|up_proj)\.bias$", P(("fsdp", "tensor"))),  # [ffn]
    (r"down_proj\.kernel(_scale)?$", P("tensor", "fsdp")),  # [ffn, d]
    (r"lm_head\.kernel$", P("fsdp", "tensor")),  # [d, vocab]
    (r"score\.kernel$", P("fsdp", None)),  # [d, num_labels]
    (r"(o_proj|down_proj)\.bias$|(norm|layernorm)\.scale$", P("fsdp")),  # [d]
    # LoRA adapters (A: [*in, r], B: [r, *out]) split like the kernels they adapt, rank replicated;
    # the factor without a d axis splits its other axis over fsdp too (else it is whole on every FSDP
    # device: 0.43 of 0.63 GiB of Llama-3-8B's r = 64 adapters per v5e-8 chip).
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.lora\.a$", P("fsdp", None)),  # [d, r]
    (r"(q_proj|k_proj|v_proj)\.lora\.b$", P(None, "tensor", "fsdp")),  # [r, heads, head_dim]
    (r"(gate_proj|up_proj)\.lora\.b$", P(None, ("tensor", "fsdp"))),  # [r, ffn]
    (r"o_proj\.lora\.a$", P("tensor", "fsdp", None)),  # [heads, head_dim, r]
    (r"down_proj\.lora\.a$", P(("tensor", "fsdp"), None)),  # [ffn, r]
    (r"(o_proj|down_proj)\.lora\.b$", P(None, "fsdp")),  # [r, d]
)


def resolve_axis_sizes(sizes: dict[str, int] | Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Axis sizes for ``AXES``; one of them may be ``-1`` (= all remaining devices)."""
    if isinstance(sizes, dict) or hasattr(sizes, "keys"):
        unknown = set(sizes.keys()) - set(AXES)
        if unknown:
            raise ValueError(f"mesh: unknown axis name(s) {sorted(unknown)}; valid axes: {list(AXES)}")
        sizes = [int(sizes.get(a, 1)) for a in AXES]
    sizes = [int(s) for s in sizes]
    if len(sizes) != len(AXES) or sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: need sizes for {list(AXES)}, each >= 1 and at most one -1; got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(AXES, sizes))}: the fixed axes ({known}) do not divide "
                             f"the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} has {math.prod(sizes)} slots but there are {num_devices} "
                         f"devices; make the product equal the device count (or use -1 for one axis)")
    return tuple(sizes)


def make_mesh(sizes: dict[str, int] | Sequence[int] = (1, 1, -1), devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all global devices, every host) with axes ``AXES``."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_axis_sizes(sizes, len(devices))
    try:  # topology-aware placement on TPU/GPU; plain reshape elsewhere
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES)


def path_str(path) -> str:
    """Dotted name of a PyTree key path, dropping nnx's ``.value`` leaf key."""
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        if name != "value":
            parts.append(str(name))
    return ".".join(parts)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, name: str) -> P:
    """Drop mesh axes from dimensions they do not divide (those dimensions stay replicated)."""
    if len(spec) > len(shape):
        raise ValueError(f"partition rule {spec} has more dimensions than parameter {name} {shape}")
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
        if axes is not None and dim % size:
            if dim > 1:  # a size-1 axis (a per-channel scale's input axes) is replicated by nature
                logging.log_first_n(logging.WARNING, "%s %s: dimension %d not divisible by mesh axes %s; "
                                    "replicated", 8, name, shape, dim, axes)
            axes = None
        fitted.append(axes)
    return P(*fitted)


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh, rules=PARTITION_RULES) -> P:
    """The partition spec of the parameter called ``name`` (a dotted path) with this shape."""
    for pattern, spec in rules:
        if re.search(pattern, name):
            return _fit(spec, tuple(shape), mesh, name)
    raise ValueError(f"no partition rule matches parameter {name!r} {tuple(shape)}; add one to PARTITION_RULES")


def param_shardings(params, mesh: Mesh, rules=PARTITION_RULES):
    """A PyTree of ``NamedSharding`` matching ``params`` (an nnx State or any PyTree of arrays)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(path_str(path), x.shape, mesh, rules)), params)


def sharding_fn(mesh: Mesh, rules=PARTITION_RULES):
    """``(dotted_path, shape) -> Sharding`` for ``load_pretrained(shardings=...)``: load straight to the mesh."""
    return lambda name, shape: NamedSharding(mesh, spec_for(name, shape, mesh, rules))


def opt_state_shardings(tx: optax.GradientTransformation, opt_state, params, mesh: Mesh, rules=PARTITION_RULES):
    """Optimizer state laid out like the parameters it mirrors (Adam moments etc.); other leaves
    (step counts, hyperparameters, Adafactor's factored statistics) are replicated."""
    replicated = NamedSharding(mesh, P())
    p_shardings = param_shardings(params, mesh, rules)

    def place(leaf, sharding, param):
        return sharding if tuple(leaf.shape) == tuple(param.shape) else replicated

    return optax.tree_map_params(tx, place, opt_state, p_shardings, params,
                                 transform_non_params=lambda _: replicated)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over the data-parallel axes, everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_batch(batch, mesh: Mesh):
    """Place a host batch (this process's rows) on the mesh as one global array per field."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def bytes_per_device(tree) -> dict[Any, int]:
    """Bytes each device holds of ``tree`` (counts shards, so replication shows up)."""
    totals: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals
