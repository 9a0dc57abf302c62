"""Per-token and per-sequence log-probabilities from logits, always in float32.

Alignment convention (the one ``tokenization.pack_pairs`` produces): ``loss_mask[:, t] = 1`` marks
token ``t`` of ``input_ids`` as a response token, predicted by ``logits[:, t - 1]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(
    logits: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    vocab_chunk_size: int | None = None,
) -> jax.Array:
    """``log softmax(logits / T)[targets]``: ``logits [..., vocab]``, ``targets [...]`` -> float32 ``[...]``.

    With ``vocab_chunk_size`` the normaliser is accumulated over vocabulary chunks (a scan), so no
    float32 copy of the full ``[..., vocab]`` tensor is ever held: for large vocabularies in bf16.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for log-probabilities, got {temperature}")
    inv_t = 1.0 / temperature
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    target_logit = target_logit.astype(jnp.float32) * inv_t
    if vocab_chunk_size is None or vocab_chunk_size >= logits.shape[-1]:
        return target_logit - jax.nn.logsumexp(logits.astype(jnp.float32) * inv_t, axis=-1)
    return target_logit - _chunked_logsumexp(logits, vocab_chunk_size, inv_t)


def _chunked_logsumexp(logits: jax.Array, chunk: int, inv_t: float) -> jax.Array:
    vocab = logits.shape[-1]
    n_chunks = -(-vocab // chunk)
    pad = n_chunks * chunk - vocab
    if pad:
        neg = jnp.full(logits.shape[:-1] + (pad,), -jnp.inf, logits.dtype)
        logits = jnp.concatenate([logits, neg], axis=-1)
    chunks = jnp.moveaxis(logits.reshape(logits.shape[:-1] + (n_chunks, chunk)), -2, 0)

    def step(lse, block):
        return jnp.logaddexp(lse, jax.nn.logsumexp(block.astype(jnp.float32) * inv_t, axis=-1)), None

    init = jnp.full(logits.shape[:-1], -jnp.inf, jnp.float32)
    lse, _ = jax.lax.scan(step, init, chunks)
    return lse


def masked_token_logprobs(
    logits: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    *,
    temperature: float = 1.0,
    vocab_chunk_size: int | None = None,
) -> jax.Array:
    """Per-token log-probs ``[b, t - 1]`` of ``input_ids[:, 1:]``, 0 off ``loss_mask[:, 1:]``: the terms
    ``sequence_logprobs`` sums, for losses that weight tokens one by one (Nash-MD)."""
    per_token = token_logprobs(
        logits[:, :-1], input_ids[:, 1:], temperature=temperature, vocab_chunk_size=vocab_chunk_size
    )
    return per_token * loss_mask[:, 1:].astype(jnp.float32)


def sequence_logprobs(
    logits: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    *,
    temperature: float = 1.0,
    vocab_chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sum of response-token log-probs and response lengths.

    Args:
      logits: ``[b, t, vocab]`` from a forward pass over ``input_ids``.
      input_ids, loss_mask: ``[b, t]``; see the module docstring for the alignment.
    Returns:
      ``(logps [b], lengths [b])`` in float32; a row with an empty mask gets ``logps = 0``.
    """
    tokens = masked_token_logprobs(
        logits, input_ids, loss_mask, temperature=temperature, vocab_chunk_size=vocab_chunk_size
    )
    return jnp.sum(tokens, axis=-1), jnp.sum(loss_mask[:, 1:].astype(jnp.float32), axis=-1)
