"""Jitted KV-cache sampling: prefill once, broadcast the cache to k samples, decode in a while_loop.

Shapes are bucketed (prompt length and new-token budget rounded up to powers of two) so a run
compiles a handful of programs, whichever prompts it sees; ``compile_counts()`` reports how many.
Parameters are arguments of the jitted functions (never closed-over constants), the cache is
donated to the decode loop, and the loop exits as soon as every row has emitted an EOS. Under a
mesh, shard the prompts' batch axis (``batch_sharding``) and pass a model whose parameters carry
the training layout: jit propagates both, and the PRNG draws do not depend on the layout.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sail_jax.distributed import global_array
from sail_jax.models.transformer import init_cache

_COMPILES: collections.Counter = collections.Counter()


def compile_counts() -> dict[str, int]:
    """How many times the prefill and decode programs were traced (= compiled) in this process."""
    return dict(_COMPILES)


@flax.struct.dataclass
class SampleOutput:
    """``tokens [n, max_new_tokens]`` (pad after the first EOS), ``mask`` (1 up to and including it),
    ``lengths [n]``, ``logprobs [n, max_new_tokens]`` of each token under the sampling distribution
    (at temperature 1 for greedy decoding; 0 where masked), ``finished [n]`` (saw EOS).
    Rows are ordered prompt-major: row ``i * num_samples + j`` is sample j of prompt i."""

    tokens: jax.Array
    mask: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    finished: jax.Array


def bucket(n: int, minimum: int = 8) -> int:
    """Round up to a power of two (at least ``minimum``) so shapes, and compiles, are shared."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def cache_length(prompt_length: int, max_new_tokens: int) -> int:
    """Slots of the KV cache ``generate`` decodes into: the bucketed prompt and the bucketed budget."""
    return bucket(prompt_length) + bucket(max_new_tokens)


def filter_logits(logits: jax.Array, temperature, top_k: int, use_top_p: bool, top_p) -> jax.Array:
    """The sampling distribution's logits: ``logits / T``, then top-k, then nucleus (top-p) filtering.

    Removed tokens get ``-inf``; the most likely token always survives.
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def row_uniforms(key: jax.Array, step, row, rows: int) -> jax.Array:
    """The uniform of batch row ``row`` (of ``rows``) at decode step ``step``: element ``row`` of
    ``uniform(fold_in(key, step), (rows,))``. Every decoder draws through it, so a sample's tokens do
    not depend on which rows decode beside it (the shrinking batch, continuous batching's slots)."""
    return jax.random.uniform(jax.random.fold_in(key, step), (rows,))[row]


def categorical_from_uniform(u: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row from ``softmax(logits [n, vocab])`` with the row's uniform ``u [n]``;
    returns ``(tokens, logprobs)``.

    Two-level inverse CDF with one uniform per row: pick a block of ~sqrt(vocab) tokens by its mass,
    then the token inside it. Exact up to float rounding, and about 20x cheaper on CPU than the Gumbel
    trick (``jax.random.categorical`` draws and takes two logs of vocab-many uniforms per row, and a
    flat cumsum over the vocabulary is slow on XLA:CPU). Tokens at ``-inf`` are never drawn.
    """
    n, vocab = logits.shape
    block = bucket(math.isqrt(vocab), minimum=1)
    blocks = -(-vocab // block)
    logits = jnp.pad(logits.astype(jnp.float32), ((0, 0), (0, blocks * block - vocab)), constant_values=-jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - top).reshape(n, blocks, block)
    block_mass = jnp.sum(weights, axis=-1)
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    total = block_cdf[:, -1]
    # Clamping u (and the remainder below) strictly under the running total keeps rounding from
    # stepping past the last token of positive mass.
    u = jnp.minimum(u * total, jnp.nextafter(total, 0.0))
    chosen = jnp.sum(block_cdf <= u[:, None], axis=-1)
    inner = jnp.take_along_axis(weights, chosen[:, None, None], axis=1)[:, 0]
    inner_cdf = jnp.cumsum(inner, axis=-1)
    before = jnp.take_along_axis(block_cdf - block_mass, chosen[:, None], axis=-1)[:, 0]
    rest = jnp.clip(u - before, 0.0, jnp.nextafter(inner_cdf[:, -1], 0.0))
    tokens = (chosen * block + jnp.sum(inner_cdf <= rest[:, None], axis=-1)).astype(jnp.int32)
    return tokens, token_logprob(logits, tokens, top[:, 0], total)


def token_logprob(logits: jax.Array, tokens: jax.Array, top=None, total=None) -> jax.Array:
    """``log_softmax(logits)[tokens]`` without materialising the ``[n, vocab]`` log-softmax;
    ``top``/``total`` (the row max and ``sum(exp(logits - top))``) are reused when already known."""
    if top is None:
        top = jnp.max(logits, axis=-1)
        total = jnp.sum(jnp.exp(logits - top[:, None]), axis=-1)
    return jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - top - jnp.log(total)


class GeometricMixture(nnx.Module):
    """Nash-MD's sampling distribution π_mix(y_t | x, y<t) ∝ π(y_t | ·)^(1−m) · π_ref(y_t | ·)^m, token
    by token: logits (1 − m)·z_π + m·z_ref (each model's log-normaliser only shifts a row), then the
    usual temperature / top-k / top-p. ``generate`` takes it like a model and keeps both models' KV
    caches in one decode loop."""

    def __init__(self, policy: nnx.Module, reference: nnx.Module, coef: float):
        if not 0.0 <= coef <= 1.0:
            raise ValueError(f"the mixture coefficient must be in [0, 1], got {coef}")
        self.policy, self.reference, self.coef = policy, reference, float(coef)

    def mix(self, policy_logits: jax.Array, reference_logits: jax.Array) -> jax.Array:
        return (1.0 - self.coef) * policy_logits.astype(jnp.float32) + self.coef * reference_logits.astype(jnp.float32)

    def extend(self, input_ids, attention_mask, cache):
        (a, cache_a), (b, cache_b) = (m.extend(input_ids, attention_mask, c)
                                      for m, c in ((self.policy, cache[0]), (self.reference, cache[1])))
        return self.mix(a, b), (cache_a, cache_b)


def _prefill_model(model, prompt_ids, prompt_mask, num_samples, cache_len):
    """The prompt's last logits and KV cache (a pair of each for a ``GeometricMixture``), repeated for k samples."""
    if isinstance(model, GeometricMixture):
        (a, cache_a), (b, cache_b) = (_prefill_model(m, prompt_ids, prompt_mask, num_samples, cache_len)
                                      for m in (model.policy, model.reference))
        return model.mix(a, b), (cache_a, cache_b)
    cache = init_cache(model.config, prompt_ids.shape[0], prompt_ids.shape[1])
    hidden, cache = model.model.extend(prompt_ids, prompt_mask, cache)
    cache = cache.grow(cache_len)
    last = model.logits(hidden[:, -1])  # prompts are left-padded: the last position is real; skip [b, t, vocab]
    if num_samples > 1:  # k samples per prompt share one prefill
        repeat = functools.partial(jnp.repeat, repeats=num_samples, axis=0)
        cache = cache.replace(keys=tuple(map(repeat, cache.keys)), values=tuple(map(repeat, cache.values)),
                              mask=repeat(cache.mask))
        last = repeat(last)
    return last, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "cache_len"))
def _prefill(graphdef, state, prompt_ids, prompt_mask, *, num_samples, cache_len):
    _COMPILES["prefill"] += 1
    return _prefill_model(nnx.merge(graphdef, state), prompt_ids, prompt_mask, num_samples, cache_len)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "greedy", "top_k", "use_top_p", "rows"), donate_argnames=("cache",)
)
def _decode(graphdef, state, cache, carry, key, max_new_tokens, temperature, top_p, eos_ids, row_ids, stop_at,
            *, greedy, top_k, use_top_p, rows):
    """Decode ``carry = (step, last logits, tokens, logprobs, finished, done_at)`` of the batch's rows
    ``row_ids`` (of ``rows``) until every row has ended, the budget is spent, or at most ``stop_at``
    rows are still going; returns the carry and the cache. Draws go through ``row_uniforms``."""
    _COMPILES["decode"] += 1
    model = nnx.merge(graphdef, state)
    n = row_ids.shape[0]

    def body(carry):
        step, cache, logits, tokens, logprobs, finished, done_at = carry
        if greedy:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            logprob = token_logprob(logits.astype(jnp.float32), token)
        else:
            dist = filter_logits(logits, temperature, top_k, use_top_p, top_p)
            token, logprob = categorical_from_uniform(row_uniforms(key, step, row_ids, rows), dist)
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(logprob)
        hit_eos = jnp.any(token[:, None] == eos_ids[None, :], axis=-1)
        done_at = jnp.where(~finished & hit_eos, step, done_at)
        finished = finished | hit_eos
        logits, cache = model.extend(token[:, None], jnp.ones((n, 1), jnp.int32), cache)
        return step + 1, cache, logits[:, -1], tokens, logprobs, finished, done_at

    def cond(carry):
        step, finished = carry[0], carry[5]
        return (step < max_new_tokens) & (jnp.sum(~finished) > stop_at)

    step, cache, *rest = jax.lax.while_loop(cond, body, (carry[0], cache, *carry[1:]))
    # Returning the cache lets XLA alias it to the donated input: one cache buffer lives at a time.
    return (step, *rest), cache


# Below this many rows a CPU decode step costs about the same whatever the rows: no further halving.
MIN_SHRUNK_ROWS = 4


def _take_rows(cache, rows):
    """The KV cache (or a mixture's pair of caches) of batch rows ``rows``."""
    if isinstance(cache, tuple):
        return tuple(_take_rows(c, rows) for c in cache)
    return cache.replace(keys=tuple(k[rows] for k in cache.keys), values=tuple(v[rows] for v in cache.values),
                         mask=cache.mask[rows])


def _decode_shrinking(graphdef, state, cache, last, key, scalars, *, n, budget, pad_id, min_rows, multiple,
                      options):
    """The static decode, but when at most half the rows are still going, those rows (topped up with
    ended ones) go on as a batch half the size: on a CPU a step of 16 rows costs well under one of 32,
    so the tail of long samples no longer pays for the rows that ended. One host sync and one compiled
    size per halving; batches never go under ``min_rows`` rows, and stay a ``multiple`` of the devices
    the batch is split over. Every row's draws are the static sampler's, so the samples are too (tested)."""
    max_new_tokens = int(scalars[0])
    ids = np.arange(n)
    carry = (jnp.int32(0), last, jnp.full((n, budget), pad_id, jnp.int32), jnp.zeros((n, budget), jnp.float32),
             jnp.zeros((n,), jnp.bool_), jnp.full((n,), budget, jnp.int32))
    out = carry[2:]  # tokens, logprobs, finished, done_at of every row, filled in as rows leave a batch
    while True:
        half = len(ids) // 2
        shrink = half >= min_rows and half % multiple == 0
        carry, cache = _decode(graphdef, state, cache, carry, key, *scalars[:4], jnp.asarray(ids, jnp.int32),
                               jnp.int32(half if shrink else 0), rows=n, **options)
        out = carry[2:] if len(ids) == n else tuple(o.at[ids].set(c) for o, c in zip(out, carry[2:]))
        done = not shrink  # else the host reads which rows ended (a sync, so never across processes)
        if shrink:
            finished = np.asarray(carry[4])
            done = int(carry[0]) >= max_new_tokens or finished.all()
        if done:
            return sample_output(*out[:2], out[3], out[2], max_new_tokens, pad_id)
        # the rows still going first, then ended ones to fill the half batch (their extra tokens are masked)
        keep = np.concatenate([np.flatnonzero(~finished), np.flatnonzero(finished)])[:half]
        ids, cache = ids[keep], _take_rows(cache, jnp.asarray(keep))
        carry = (carry[0], *(c[keep] for c in carry[1:]))


def sample_output(tokens, logprobs, done_at, finished, max_new_tokens, pad_id) -> SampleOutput:
    """A decode loop's ``[n, budget]`` tokens and log-probs as a ``SampleOutput``: each row kept up to
    and including its EOS (``done_at``; the budget when none) and within ``max_new_tokens``."""
    positions = jnp.arange(tokens.shape[1])[None, :]
    mask = (positions <= done_at[:, None]) & (positions < max_new_tokens)
    return SampleOutput(tokens=jnp.where(mask, tokens, pad_id), mask=mask.astype(jnp.int32),
                        lengths=mask.sum(-1).astype(jnp.int32), logprobs=jnp.where(mask, logprobs, 0.0),
                        finished=finished)


def generate(
    model,
    prompt_ids,
    prompt_mask,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_ids: Sequence[int] | int,
    num_samples: int = 1,
    pad_id: int = 0,
    batch_sharding: jax.sharding.Sharding | None = None,
    slots: int = 0,
    shrink: bool = True,
) -> SampleOutput:
    """Sample ``num_samples`` responses per left-padded prompt ``[b, t]``; ``temperature=0`` is greedy.
    ``model`` is a causal LM, or a ``GeometricMixture`` of two (Nash-MD's opponent).

    ``slots``: 0 decodes all ``b * num_samples`` rows at once until the longest ends; S > 0 decodes
    through S slots, a row that ends handing its slot to the next sample (``sail_jax.continuous``;
    the same samples for the same key; a mixture, or S >= the rows, decodes all at once).
    ``shrink`` (static decoding): once at most half the rows are still going, decode those as a batch
    half the size (``_decode_shrinking``; the same samples; off across processes).
    Deterministic for a given ``key``. Returns a ``SampleOutput`` with ``b * num_samples`` rows.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or num_samples < 1 or slots < 0:
        raise ValueError(
            f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0, num_samples >= 1, slots >= 0; got "
            f"temperature={temperature}, top_p={top_p}, top_k={top_k}, num_samples={num_samples}, slots={slots}"
        )
    eos = jnp.asarray(np.atleast_1d(np.asarray(eos_ids, np.int32)))
    prompt_ids, prompt_mask = np.asarray(prompt_ids, np.int32), np.asarray(prompt_mask, np.int32)
    length = bucket(prompt_ids.shape[1])
    pad = length - prompt_ids.shape[1]
    prompt_ids = np.pad(prompt_ids, ((0, 0), (pad, 0)), constant_values=pad_id)
    prompt_mask = np.pad(prompt_mask, ((0, 0), (pad, 0)))
    if batch_sharding is not None:  # every process passes the whole batch; each places its own rows
        prompt_ids, prompt_mask = global_array(prompt_ids, batch_sharding), global_array(prompt_mask, batch_sharding)
    budget = bucket(max_new_tokens)
    graphdef, state = nnx.split(model)
    options = dict(budget=budget, greedy=temperature == 0, top_k=top_k, use_top_p=top_p < 1.0)
    scalars = (jnp.int32(max_new_tokens), jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), eos,
               jnp.int32(pad_id))
    if 0 < slots < prompt_ids.shape[0] * num_samples and not isinstance(model, GeometricMixture):
        from sail_jax.continuous import decode_continuous

        out = decode_continuous(graphdef, state, prompt_ids, prompt_mask, key, *scalars, num_samples=num_samples,
                                slots=slots, **options)
        return jax.tree.map(lambda x: x[:, :max_new_tokens] if x.ndim == 2 else x, out)
    last, cache = _prefill(graphdef, state, prompt_ids, prompt_mask, num_samples=num_samples,
                           cache_len=cache_length(length, max_new_tokens))
    devices = 1 if batch_sharding is None else len(batch_sharding.device_set)
    n = prompt_ids.shape[0] * num_samples
    min_rows = max(MIN_SHRUNK_ROWS, devices) if shrink and jax.process_count() == 1 else n  # n: never shrink
    out = _decode_shrinking(graphdef, state, cache, last, key, scalars, n=n, budget=budget, pad_id=pad_id,
                            min_rows=min_rows, multiple=devices,
                            options={k: v for k, v in options.items() if k != "budget"})
    return jax.tree.map(lambda x: x[:, :max_new_tokens] if x.ndim == 2 else x, out)
