"""Routing, pair selection and preference labels for the online loop: pure functions of arrays and keys.

Conventions: ``scores [n, k]`` rank the k samples of each prompt (the implicit reward
β·log(π/π_ref) for SAIL-PP, the reward source for SAIL-PR); a label says whether the pair's first
response ``a`` is preferred to ``b``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sail_jax.sail_terms import ROUTE_DP, ROUTE_OFFLINE, ROUTE_PP, ROUTE_PR

PAIR_SELECTION = ("first_two", "max_min", "random")
LABEL_MODES = ("sample", "argmax")


def draw_routes(key: jax.Array, n: int, *, p_dp: float, p_pp: float, p_pr: float) -> jax.Array:
    """Each example's route, independently: DP/PP/PR with their probabilities, offline otherwise."""
    u = jax.random.uniform(key, (n,))
    edges = jnp.cumsum(jnp.array([p_dp, p_pp, p_pr]))
    return jnp.select([u < edges[0], u < edges[1], u < edges[2]], [ROUTE_DP, ROUTE_PP, ROUTE_PR],
                      ROUTE_OFFLINE).astype(jnp.int32)


def select_pairs(key: jax.Array, scores: jax.Array, method: str) -> tuple[jax.Array, jax.Array]:
    """Indices ``(a, b)`` ``[n]`` of the two samples to compare among each prompt's k."""
    n, k = scores.shape
    if method == "first_two":
        return jnp.zeros(n, jnp.int32), jnp.ones(n, jnp.int32)
    if method == "max_min":
        return jnp.argmax(scores, axis=1).astype(jnp.int32), jnp.argmin(scores, axis=1).astype(jnp.int32)
    if method == "random":
        a = jax.random.randint(key, (n,), 0, k)
        b = (a + jax.random.randint(jax.random.fold_in(key, 1), (n,), 1, k)) % k  # distinct from a
        return a.astype(jnp.int32), b.astype(jnp.int32)
    raise ValueError(f"unknown pair_selection {method!r}; valid: {list(PAIR_SELECTION)}")


def preference_labels(key: jax.Array, score_a: jax.Array, score_b: jax.Array, mode: str):
    """``(a_wins, tie)``: ``sample`` draws a ≻ b with probability σ(score_a − score_b) (Bradley–Terry);
    ``argmax`` prefers the higher score and reports exact ties (to be dropped, not guessed)."""
    if mode == "sample":
        p = jax.nn.sigmoid(score_a - score_b)
        return jax.random.uniform(key, score_a.shape) < p, jnp.zeros(score_a.shape, jnp.bool_)
    if mode == "argmax":
        return score_a > score_b, score_a == score_b
    raise ValueError(f"unknown label mode {mode!r}; valid: {list(LABEL_MODES)}")


def dp_swaps(key: jax.Array, h: jax.Array, beta: float) -> jax.Array:
    """SAIL-DP: resample the dataset pair's label from the policy: swap with probability 1 − σ(β·h)."""
    return jax.random.uniform(key, h.shape) >= jax.nn.sigmoid(beta * h)
