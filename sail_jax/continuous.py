"""Continuous batching: a fixed number of decode slots over the queue of a generation block's samples.

The static sampler decodes every row until the longest has ended, so rows that ended early keep
costing a decode step each until the last one does. Here ``slots`` rows decode at once; when a row
ends (EOS or the token budget) its slot takes the next sample in the queue: the sample's prompt,
prefilled once for its k samples before the loop, is copied into the slot's region of the KV cache
(JetStream's insert) and the slot decodes on from there. Each slot sits at its own cache position
(``KVCache.end`` per row), so shapes stay static: one compiled program per (prompt bucket, budget,
slots). ``sampling.generate(..., slots=S)`` runs it.

Every draw is the static sampler's: sample r's token t uses ``sampling.row_uniforms(key, t, r, n)``,
as the static sampler does, so for one key both give the same samples, whichever slot a sample lands
in and whenever (tested).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sail_jax.models.transformer import init_cache
from sail_jax.sampling import (_COMPILES, SampleOutput, categorical_from_uniform, filter_logits, row_uniforms,
                               sample_output, token_logprob)


def _insert(take, request, num_samples, prompts, slots):
    """Slots ``take`` start sample ``request`` (of prompt ``request // k``): the prompt's prefilled
    keys, values and mask in the first slots of their cache rows, its last logits as theirs."""
    cache, logits, pos = slots
    p_cache, p_logits = prompts
    src = jnp.where(take, request // num_samples, 0)
    plen = p_cache.mask.shape[1]

    def put(old, new, axis):  # rows ``take`` get ``new`` [S, ..., plen] in their first plen slots of ``axis``
        head = jax.lax.slice_in_dim(old, 0, plen, axis=axis)
        where = take.reshape((-1,) + (1,) * (old.ndim - 1))
        return jax.lax.dynamic_update_slice_in_dim(old, jnp.where(where, new[src], head), 0, axis=axis)

    keys = tuple(put(k, pk, 2) for k, pk in zip(cache.keys, p_cache.keys))
    values = tuple(put(v, pv, 3) for v, pv in zip(cache.values, p_cache.values))
    mask = jnp.where(take[:, None], jnp.pad(p_cache.mask[src], ((0, 0), (0, cache.max_len - plen))), cache.mask)
    cache = cache.replace(keys=keys, values=values, mask=mask, end=jnp.where(take, plen, cache.end))
    return cache, jnp.where(take[:, None], p_logits[src], logits), jnp.where(take, 0, pos)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "slots", "budget", "greedy", "top_k",
                                             "use_top_p"))
def decode_continuous(graphdef, state, prompt_ids, prompt_mask, key, max_new_tokens, temperature, top_p, eos_ids,
                      pad_id, *, num_samples, slots, budget, greedy, top_k, use_top_p) -> SampleOutput:
    """``num_samples`` samples of each left-padded prompt ``[b, plen]`` through ``slots`` decode slots."""
    _COMPILES["continuous"] += 1
    model = nnx.merge(graphdef, state)
    b, plen = prompt_ids.shape
    n = b * num_samples
    hidden, p_cache = model.model.extend(prompt_ids, prompt_mask, init_cache(model.config, b, plen))
    prompts = (p_cache, model.logits(hidden[:, -1]))  # every prompt prefilled once, for its k samples
    cache = init_cache(model.config, slots, plen + budget)
    cache = cache.replace(end=jnp.zeros((slots,), jnp.int32))
    vocab = prompts[1].shape[-1]

    def body(carry):
        cache, logits, request, pos, queued, tokens, logprobs, done_at, finished = carry
        free = request < 0
        new = queued + jnp.cumsum(free) - 1
        take = free & (new < n)
        cache, logits, pos = jax.lax.cond(
            jnp.any(take), lambda s: _insert(take, new, num_samples, prompts, s), lambda s: s, (cache, logits, pos))
        request = jnp.where(take, new, request)
        queued = queued + jnp.sum(take)
        active = request >= 0
        if greedy:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            logprob = token_logprob(logits.astype(jnp.float32), token)
        else:
            dist = filter_logits(logits, temperature, top_k, use_top_p, top_p)
            u = jax.vmap(lambda t, r: row_uniforms(key, t, r, n))(pos, jnp.maximum(request, 0))
            token, logprob = categorical_from_uniform(u, dist)
        row = jnp.where(active, request, n)  # inactive slots write to a spare row
        tokens = tokens.at[row, pos].set(token, mode="drop")
        logprobs = logprobs.at[row, pos].set(logprob, mode="drop")
        hit_eos = jnp.any(token[:, None] == eos_ids[None, :], axis=-1) & active
        done_at = done_at.at[row].set(jnp.where(hit_eos, pos, done_at[row]), mode="drop")
        finished = finished.at[row].set(hit_eos | finished[row], mode="drop")
        ended = active & (hit_eos | (pos + 1 >= max_new_tokens))
        end = cache.end
        logits, cache = model.extend(token[:, None], active[:, None].astype(jnp.int32), cache)
        cache = cache.replace(end=jnp.where(active, end + 1, end))
        return (cache, logits[:, -1], jnp.where(ended, -1, request), pos + 1, queued, tokens, logprobs, done_at,
                finished)

    def cond(carry):
        request, queued = carry[2], carry[4]
        return (queued < n) | jnp.any(request >= 0)

    init = (cache, jnp.zeros((slots, vocab), prompts[1].dtype), jnp.full((slots,), -1, jnp.int32),
            jnp.zeros((slots,), jnp.int32), jnp.int32(0), jnp.full((n + 1, budget), pad_id, jnp.int32),
            jnp.zeros((n + 1, budget), jnp.float32), jnp.full((n + 1,), budget, jnp.int32),
            jnp.zeros((n + 1,), jnp.bool_))
    *_, tokens, logprobs, done_at, finished = jax.lax.while_loop(cond, body, init)
    return sample_output(tokens[:n], logprobs[:n], done_at[:n], finished[:n], max_new_tokens, pad_id)
