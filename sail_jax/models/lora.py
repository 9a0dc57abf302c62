"""LoRA adapters on the model's ``Linear`` projections: ``y = x·W + (alpha/r)·(x·A)·B``.

The base stays frozen (``nnx.Param``); only the adapters (``nnx.LoRAParam``) train, so gradients and
optimizer state exist for them alone, and the base with the adapters off is the reference: one copy
of the base weights serves both. Adapters are float32 whatever the base's storage dtype, and are
computed in the model's compute dtype. ``A`` starts as PEFT's (uniform in ±1/sqrt(fan_in)) and
``B`` at zero, so a fresh adapter gives exactly the base model's logits. Adapter dropout (PEFT's
``lora_dropout``, on the adapter's input only) acts only inside a train step, which hands every
adapter a key (``with_dropout_keys``); sampling, labelling and evaluation run without it.

Why not qwix (Google's JAX LoRA library): it adds adapters by intercepting ``dot_general`` calls
whose right operand *is* a module's parameter. Our ``Linear`` casts the kernel to the compute dtype
and contracts multi-axis kernels (``q_proj: [d, heads, head_dim]``) with ``tensordot``, which
reshapes it first, so qwix finds no parameter there and silently adds nothing. An adapter owned by
``Linear`` is twenty lines and keeps the heads axis that tensor parallelism splits.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from sail_jax.models.quantize import dequantize_layer

# The paper's targets: every attention and MLP projection (not the embeddings, norms or heads).
DEFAULT_TARGETS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


class LoRA(nnx.Module):
    """``A: [*in, r]``, ``B: [r, *out]``; ``__call__`` maps the layer's input to its output delta."""

    def __init__(self, in_shape, out_shape, *, rank: int, alpha: float, dropout: float = 0.0, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        self.a = nnx.LoRAParam(jax.random.uniform(rngs.params(), (*in_shape, rank), jnp.float32, -bound, bound))
        self.b = nnx.LoRAParam(jnp.zeros((rank, *out_shape), jnp.float32))
        self.scale = alpha / rank
        self.n_in = len(in_shape)
        self.dropout = dropout
        self.dropout_key = nnx.data(None)  # set only on the train step's copy of the model

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dropout > 0 and self.dropout_key is not None:
            keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / jnp.asarray(1.0 - self.dropout, x.dtype), jnp.zeros((), x.dtype))
        axes = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        h = jnp.tensordot(x, self.a[...].astype(x.dtype), axes=axes)
        return jnp.tensordot(h, self.b[...].astype(x.dtype), axes=1) * jnp.asarray(self.scale, x.dtype)

    def delta(self) -> jax.Array:
        """The weight update ``(alpha/r)·A·B``, shaped like the kernel (what merging adds)."""
        return jnp.tensordot(self.a[...], self.b[...], axes=1) * self.scale


def adapted_layers(model: nnx.Module, targets: str = DEFAULT_TARGETS):
    """``(dotted path, Linear)`` for every projection whose path matches ``targets``."""
    from sail_jax.models.transformer import Linear

    pattern = re.compile(targets)
    for path, module in nnx.iter_graph(model):
        name = ".".join(map(str, path))
        if isinstance(module, Linear) and pattern.search(name):
            yield name, module


def add_lora(model: nnx.Module, *, rank: int, alpha: float, targets: str = DEFAULT_TARGETS, dropout: float = 0.0,
             seed: int = 0) -> int:
    """Attach a fresh adapter to every targeted projection (in place); returns how many."""
    rngs = nnx.Rngs(params=jax.random.key(seed))
    layers = list(adapted_layers(model, targets))
    if not layers:
        raise ValueError(f"lora.targets={targets!r} matches no projection of this model (paths look like "
                         "model.layers.0.self_attn.q_proj)")
    for _, layer in layers:
        layer.lora = LoRA(layer.in_shape, layer.out_shape, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs)
    return len(layers)


def with_dropout_keys(model: nnx.Module, key: jax.Array) -> nnx.Module:
    """Give every adapter with dropout its own key for this forward pass (in place, on the train step's
    merged copy; ``key`` comes from the step's key, so a resumed run drops the same units)."""
    for i, (_, layer) in enumerate(adapted_layers(model, r"")):
        if layer.lora is not None and layer.lora.dropout > 0:
            layer.lora.dropout_key = jax.random.fold_in(key, i)
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its kernel and remove it (in place): the plain model the adapters
    define, which ``export/`` holds and any Hugging Face loader reads."""
    for _, layer in adapted_layers(model, r""):
        if layer.lora is not None:
            if layer.quant is not None:
                dequantize_layer(layer)  # a quantized base: the export holds plain kernels
            kernel = layer.kernel[...]
            layer.kernel[...] = (kernel.astype(jnp.float32) + layer.lora.delta()).astype(kernel.dtype)
            layer.lora = None
    return model
