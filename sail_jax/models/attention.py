"""Attention: the mask, grouped-query dot-product attention, and its blockwise causal form.

A sequence attending to itself with no cache (training, scoring, a reference pass) never reads keys
after a query, so the causal form splits the queries into blocks and gives block i only the keys up
to its own end: the masked upper triangle of ``[t, t]`` scores is never computed. At 1024 tokens in
4 blocks that is 10 of 16 score blocks; SmolLM2-135M's packed step (3 rows of 1024, activations
checkpointed) went from 34.5 s to 20.1 s on a 2-core CPU, where XLA:CPU materialises every score.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_MASKED = float(jnp.finfo(jnp.float32).min)
CAUSAL_BLOCK = 128  # the narrowest query block worth its own matmuls
# 4 blocks compute 10/16 of the scores (8: 36/64) and ran SmolLM2's packed step as fast (0.58x dense
# against 0.57x), while a program's first run, warm cache or not, cost ~20 s over its step instead of ~40
# (docs/benchmarks.md, "Attention"): the first use of every new shape pays it.
CAUSAL_MAX_BLOCKS = 4


def make_attention_mask(q_pos, k_pos, q_slot, k_slot, k_valid, window: int | None) -> jax.Array:
    """Boolean ``[b, t, s]``: query t may see key s (valid, causal in slot order, inside the window)."""
    allowed = k_valid[:, None, :] & (k_slot[:, None, :] <= q_slot[:, :, None])
    if window is not None:
        allowed &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
    return allowed


def dot_product_attention(q, k, v, mask) -> jax.Array:
    """Grouped-query attention. ``q [b,t,h,d]``, ``k [b,kv,s,d]``, ``v [b,kv,d,s]``, ``mask [b,t,s]``
    -> ``[b,t,h,d]``.

    Keys and values come in the KV cache's layout, where both matmuls contract their operands'
    minor axes, so a decode step reads the cache in place (with ``[b,s,kv,d]`` XLA:CPU transposed
    the whole cache, three copies per layer per step). Softmax in float32; fully masked rows
    (padding queries) get uniform weights instead of NaN.
    """
    b, t, h, d = q.shape
    kv = k.shape[1]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bkds->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def causal_attention(q, k, v, mask) -> jax.Array:
    """``dot_product_attention`` where queries and keys are the same slots (no cache) and ``mask`` is
    causal in slot order (``make_attention_mask``): query block i reads keys ``[0, end_i)`` only.
    Exact for every query that sees a key: the keys left out are masked for the whole block (a fully
    masked padding query's uniform weights spread over fewer keys; nothing reads its output)."""
    t = q.shape[1]
    blocks = min(CAUSAL_MAX_BLOCKS, t // CAUSAL_BLOCK)
    if blocks < 2:
        return dot_product_attention(q, k, v, mask)
    size = -(-t // blocks)
    outs = [dot_product_attention(q[:, start:start + size], k[:, :, :start + size], v[:, :, :, :start + size],
                                  mask[:, start:start + size, :start + size])
            for start in range(0, t, size)]
    return jnp.concatenate(outs, axis=1)
