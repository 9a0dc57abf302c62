"""Decoder-only transformer (Llama / Qwen2 / Mistral family) in flax.nnx, with a KV cache.

Module and parameter names mirror Hugging Face's (``model.layers.3.self_attn.q_proj.kernel``) so that
checkpoint conversion and sharding rules read naturally. Projection kernels keep heads as their own
axis (``q_proj.kernel: [d, heads, head_dim]``) so tensor parallelism can split heads directly.

Positions are always derived from the attention mask (``cumsum(mask) - 1``), so a left-padded row
gives the same logits as the same row unpadded, with or without the cache.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from sail_jax.models.attention import causal_attention, dot_product_attention, make_attention_mask
from sail_jax.models.config import ModelConfig
from sail_jax.models.quantize import dequantize_kernel


class Linear(nnx.Module):
    """``y = x · kernel (+ bias)`` contracting the trailing ``len(in_shape)`` axes of ``x``.

    ``in_shape``/``out_shape`` are the kernel's logical shape: a quantized base (QLoRA,
    ``sail_jax.models.quantize``) stores codes of another shape in ``kernel`` and their scales in
    ``kernel_scale``, and ``weight()`` gives the kernel they stand for."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *, bias: bool, config: ModelConfig, rngs: nnx.Rngs):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        init = jax.nn.initializers.normal(stddev=0.02)
        self.kernel = nnx.Param(init(rngs.params(), self.in_shape + self.out_shape, config.weight_dtype))
        self.bias = nnx.Param(jnp.zeros(self.out_shape, config.weight_dtype)) if bias else None
        self.n_in = len(self.in_shape)
        self.dtype = config.compute_dtype
        self.weight_dtype = config.weight_dtype
        self.quant = None  # "int8" / "nf4" when the kernel is stored quantized
        self.kernel_scale = nnx.data(None)
        self.lora = nnx.data(None)  # a LoRA adapter (sail_jax.models.lora), when attached

    def weight(self) -> jax.Array:
        """The kernel ``[*in, *out]`` in the compute dtype (dequantized first when stored quantized)."""
        if self.quant is None:
            return self.kernel[...].astype(self.dtype)
        return dequantize_kernel(self.kernel[...], self.kernel_scale[...], self.n_in, self.quant).astype(self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        axes = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jnp.tensordot(x, self.weight(), axes=axes)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32 then cast back, as transformers does."""

    def __init__(self, dim: int, *, config: ModelConfig):
        self.scale = nnx.Param(jnp.ones((dim,), config.weight_dtype))
        self.eps = config.rms_norm_eps
        self.dtype = config.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    """Inverse frequencies ``[head_dim // 2]`` including the ``linear`` and Llama-3 scalings."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    params = config.rope_params
    rope_type = params.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = jnp.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate ``x [b, t, heads, head_dim]`` by ``positions [b, t]`` (half-split convention)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
    cos = jnp.cos(freqs)[:, :, None, :]
    sin = jnp.sin(freqs)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


@flax.struct.dataclass
class KVCache:
    """Preallocated keys/values for incremental decoding; a PyTree, so it can be donated to jit.

    keys: per layer ``[batch, kv_heads, max_len, head_dim]``, values ``[batch, kv_heads, head_dim,
    max_len]`` (see ``dot_product_attention``); ``mask [batch, max_len]`` marks
    slots holding real tokens; slots ``[0, end)`` have been written.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    mask: jax.Array
    end: jax.Array

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    def grow(self, max_len: int) -> "KVCache":
        """The same cache with room for ``max_len`` slots (new slots empty). Prefilling into a cache
        sized to the prompt and growing it after keeps the prompt's attention off the empty slots."""
        extra = max_len - self.max_len
        pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
        return self.replace(keys=tuple(pad(k, 2) for k in self.keys), values=tuple(pad(v, 3) for v in self.values),
                            mask=pad(self.mask, 1))


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    dtype = dtype or config.compute_dtype
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    values_shape = (batch_size, config.num_kv_heads, config.head_dim, max_len)
    return KVCache(
        keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        values=tuple(jnp.zeros(values_shape, dtype) for _ in range(config.num_layers)),
        mask=jnp.zeros((batch_size, max_len), jnp.bool_),
        end=jnp.zeros((), jnp.int32),
    )


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = Linear((d,), (h, hd), bias=config.qkv_bias, config=config, rngs=rngs)
        self.k_proj = Linear((d,), (kv, hd), bias=config.qkv_bias, config=config, rngs=rngs)
        self.v_proj = Linear((d,), (kv, hd), bias=config.qkv_bias, config=config, rngs=rngs)
        self.o_proj = Linear((h, hd), (d,), bias=config.o_bias, config=config, rngs=rngs)
        self.window = config.window(layer)

    def __call__(self, x, positions, inv_freq, mask_fn, cache_kv=None):
        """``cache_kv``: None, or ``(k_cache, v_cache, end)`` to write this chunk at slot ``end`` (a
        scalar, or ``[b]`` slots of one token each: continuous batching's rows are each at their own)."""
        q = apply_rope(self.q_proj(x), positions, inv_freq)
        k = apply_rope(self.k_proj(x), positions, inv_freq).transpose(0, 2, 1, 3)  # [b, kv, t, d]
        v = self.v_proj(x).transpose(0, 2, 3, 1)  # [b, kv, d, t]
        if cache_kv is not None:
            k_cache, v_cache, end = cache_kv
            if end.ndim:
                rows = jnp.arange(k.shape[0])
                k = k_cache.at[rows, :, end].set(k[:, :, 0].astype(k_cache.dtype))
                v = v_cache.at[rows, :, :, end].set(v[:, :, :, 0].astype(v_cache.dtype))
            else:
                k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), end, axis=2)
                v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), end, axis=3)
        attend = dot_product_attention if cache_kv is not None else causal_attention
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask_fn(self.window))
        return self.o_proj(out), (k, v)


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear((d,), (f,), bias=config.mlp_bias, config=config, rngs=rngs)
        self.up_proj = Linear((d,), (f,), bias=config.mlp_bias, config=config, rngs=rngs)
        self.down_proj = Linear((f,), (d,), bias=config.mlp_bias, config=config, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config=config)
        self.self_attn = Attention(config, layer, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config=config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, inv_freq, mask_fn, cache_kv=None):
        attn, kv = self.self_attn(self.input_layernorm(x), positions, inv_freq, mask_fn, cache_kv)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


# ModelConfig.remat -> the jax.checkpoint policy of each decoder layer (None: no checkpointing).
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projections, recompute the rest
    "full": jax.checkpoint_policies.nothing_saveable,  # keep the layer input only
}


def constrain_batch(x: jax.Array) -> jax.Array:
    """Keep activations split over the batch axes when traced under a mesh (``jax.sharding.use_abstract_mesh``, as the train step does): without
    it, XLA may follow the FSDP-split weights and shard activations over the hidden dimension instead,
    replicating the batch (measured: 4.4x the activation memory per device on an 8-way FSDP mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in mesh.axis_names or "fsdp" not in mesh.axis_names:
        return x
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if dp == 1 or x.shape[0] % dp:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(("data", "fsdp")))


def _checkpointed_layer(layer: DecoderLayer, policy):
    """The layer as a pure function of its parameters under ``jax.checkpoint`` (split/merge rather
    than ``nnx.remat``, so a module merged inside an outer transform, like the reference, works too)."""
    graphdef, state = nnx.split(layer)

    @functools.partial(jax.checkpoint, policy=policy)
    def forward(state, x, positions, inv_freq, mask):
        return nnx.merge(graphdef, state)(x, positions, inv_freq, lambda _: mask)[0]

    return lambda x, positions, inv_freq, mask: forward(state, x, positions, inv_freq, mask)


class Transformer(nnx.Module):
    """Embeddings, decoder layers and the final norm: ``input_ids -> hidden states``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(stddev=0.02)
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=config.compute_dtype, param_dtype=config.weight_dtype,
            embedding_init=init, rngs=rngs,
        )
        self.layers = nnx.List([DecoderLayer(config, i, rngs=rngs) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config=config)
        self.config = config

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """``input_ids, attention_mask [b, t]`` -> hidden states ``[b, t, d]`` (no cache).

        ``segment_ids [b, t]`` (packed rows: several sequences per row, 1, 2, ... and 0 on padding;
        it replaces ``attention_mask``): positions restart at each segment and no token attends
        across segments, so each sequence gets the logits it would get alone."""
        if segment_ids is not None:
            valid = segment_ids > 0
            positions = _segment_positions(segment_ids)
        else:
            valid = (jnp.ones_like(input_ids) if attention_mask is None else attention_mask).astype(jnp.bool_)
            positions = _positions(valid, offset=0)
        slots = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)

        def mask_fn(window):
            allowed = make_attention_mask(positions, positions, slots, slots, valid, window)
            if segment_ids is not None:
                allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
            return allowed

        x = self.embed_tokens(input_ids)
        inv_freq = rope_inv_freq(self.config)
        for layer in self.layers:
            mask = mask_fn(layer.self_attn.window)
            x = constrain_batch(x)
            if self.config.remat == "none":
                x, _ = layer(x, positions, inv_freq, lambda _: mask)
            else:
                x = _checkpointed_layer(layer, REMAT_POLICIES[self.config.remat])(x, positions, inv_freq, mask)
        return constrain_batch(self.norm(x))

    def extend(self, input_ids: jax.Array, attention_mask: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Append ``input_ids [b, t]`` after the cached tokens; returns hidden states and the new cache.

        Used for prefill (empty cache, the whole left-padded prompt) and decode (``t = 1``). A cache
        whose ``end`` is ``[b]`` (each row at its own slot: continuous batching) takes one token a row.
        """
        t = input_ids.shape[1]
        new_valid = attention_mask.astype(jnp.bool_)
        positions = _positions(new_valid, offset=jnp.sum(cache.mask, axis=-1, keepdims=True))
        if cache.end.ndim:
            k_valid = cache.mask.at[jnp.arange(input_ids.shape[0]), cache.end].set(new_valid[:, 0])
            q_slot = cache.end[:, None] + jnp.arange(t)
        else:
            k_valid = jax.lax.dynamic_update_slice_in_dim(cache.mask, new_valid, cache.end, axis=1)
            q_slot = jnp.broadcast_to(cache.end + jnp.arange(t), input_ids.shape)
        k_pos = _positions(k_valid, offset=0)
        k_slot = jnp.broadcast_to(jnp.arange(cache.max_len), k_valid.shape)

        def mask_fn(window):
            return make_attention_mask(positions, k_pos, q_slot, k_slot, k_valid, window)

        x = self.embed_tokens(input_ids)
        inv_freq = rope_inv_freq(self.config)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, (k, v) = layer(x, positions, inv_freq, mask_fn, (cache.keys[i], cache.values[i], cache.end))
            keys.append(k)
            values.append(v)
        new_cache = KVCache(keys=tuple(keys), values=tuple(values), mask=k_valid, end=cache.end + t)
        return self.norm(x), new_cache



def _segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Each token's position inside its segment (packed rows): its slot minus its segment's first slot."""
    slots = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], jnp.bool_),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return (slots - jax.lax.cummax(jnp.where(starts, slots, 0), axis=1)).astype(jnp.int32)


def _positions(valid: jax.Array, offset) -> jax.Array:
    """Position of each token = number of real tokens before it (+ offset); padding gets clipped values."""
    return jnp.maximum(offset + jnp.cumsum(valid, axis=-1) - 1, 0).astype(jnp.int32)


class CausalLM(nnx.Module):
    """Language model: ``model(input_ids, attention_mask)`` -> float32 logits ``[b, t, vocab]``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = Transformer(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = Linear((config.hidden_size,), (config.vocab_size,), bias=False, config=config, rngs=rngs)
        else:
            self.lm_head = None

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Project hidden states ``[..., d]`` to float32 vocabulary logits ``[..., vocab]``."""
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        return self.logits(self.model(input_ids, attention_mask, segment_ids))

    def extend(self, input_ids, attention_mask, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Cached forward: logits ``[b, t, vocab]`` of the appended tokens and the updated cache."""
        hidden, cache = self.model.extend(input_ids, attention_mask, cache)
        return self.logits(hidden), cache


class RewardModel(nnx.Module):
    """Sequence classifier (HF ``*ForSequenceClassification``): score at the last real token.

    ``model(input_ids, attention_mask)`` -> scores ``[b]`` (or ``[b, num_labels]`` when num_labels > 1).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = Transformer(config, rngs=rngs)
        self.score = Linear((config.hidden_size,), (config.num_labels,), bias=False, config=config, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids, dtype=jnp.bool_)
        hidden = self.model(input_ids, attention_mask)
        # Rightmost real token: works for left and right padding alike.
        last = jnp.argmax(jnp.arange(input_ids.shape[1]) * attention_mask.astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        scores = self.score(pooled).astype(jnp.float32)
        return scores[:, 0] if self.config.num_labels == 1 else scores


def build_model(config: ModelConfig, *, seed: int = 0) -> CausalLM | RewardModel:
    """A randomly initialised model of the config's task."""
    cls = CausalLM if config.task == "causal_lm" else RewardModel
    return cls(config, rngs=nnx.Rngs(seed))
