"""Preference losses (TRL's family, by name) and their metrics. Pure, jit-able, float32.

All functions take per-sequence log-probs ``[batch]`` (sums over response tokens) of the policy and
the reference and return per-example values; the caller averages. SAIL's per-route objective, built
on these, is ``sail_jax.sail_terms``. Notation follows ../SAIL.md:
``h = (logπ(y_w) − logπ_ref(y_w)) − (logπ(y_l) − logπ_ref(y_l))`` and ``ℓ = log σ(β·h)``.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

_EXTRA_ARGS = {"discopop_tau": 0.05, "bco_delta": 0.0}

log_sigmoid = jax.nn.log_sigmoid


@chex.dataclass(frozen=True)
class Pair:
    """Float32 inputs shared by every loss: log-ratios, lengths and hyperparameters."""

    chosen_logps: jax.Array
    rejected_logps: jax.Array
    ref_chosen_logps: jax.Array
    ref_rejected_logps: jax.Array
    chosen_lengths: jax.Array | None
    rejected_lengths: jax.Array | None

    @property
    def chosen_logratios(self):
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self):
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def h(self):
        return self.chosen_logratios - self.rejected_logratios

    def normalised_h(self, loss_type: str):
        """Log-ratio margin with each side divided by its response length (IPO, SimPO-style)."""
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError(f"loss_type={loss_type!r} needs chosen_lengths and rejected_lengths")
        return (self.chosen_logratios / jnp.maximum(self.chosen_lengths, 1.0)
                - self.rejected_logratios / jnp.maximum(self.rejected_lengths, 1.0))


def _smoothed_sigmoid(z, eps):
    """Conservative DPO / cDPO: the label is flipped with probability ``eps``."""
    return -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def _sigmoid(p: Pair, beta, eps, extra):
    return _smoothed_sigmoid(beta * p.h, eps)


def _hinge(p: Pair, beta, eps, extra):
    return jax.nn.relu(1.0 - beta * p.h)


def _ipo(p: Pair, beta, eps, extra):
    h = p.h if p.chosen_lengths is None else p.normalised_h("ipo")
    return (h - 1.0 / (2.0 * beta)) ** 2


def _robust(p: Pair, beta, eps, extra):
    z = beta * p.h
    return (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def _exo_pair(p: Pair, beta, eps, extra):
    eps = jnp.where(eps > 0, eps, 1e-3)
    z = beta * p.h
    return (jax.nn.sigmoid(z) * (log_sigmoid(z) - jnp.log1p(-eps))
            + jax.nn.sigmoid(-z) * (log_sigmoid(-z) - jnp.log(eps)))


def _nca_pair(p: Pair, beta, eps, extra):
    c, r = beta * p.chosen_logratios, beta * p.rejected_logratios
    return -log_sigmoid(c) - 0.5 * log_sigmoid(-c) - 0.5 * log_sigmoid(-r)


def _bco_pair(p: Pair, beta, eps, extra):
    delta = extra["bco_delta"]
    return -log_sigmoid(beta * p.chosen_logratios - delta) - log_sigmoid(-(beta * p.rejected_logratios - delta))


def _sppo_hard(p: Pair, beta, eps, extra):
    return (p.chosen_logratios - 0.5 / beta) ** 2 + (p.rejected_logratios + 0.5 / beta) ** 2


def _aot(p: Pair, beta, eps, extra):
    # Optimal transport over the batch: sorted policy margins against sorted reference margins.
    delta = jnp.sort(p.chosen_logps - p.rejected_logps) - jnp.sort(p.ref_chosen_logps - p.ref_rejected_logps)
    return _smoothed_sigmoid(beta * delta, eps)


def _aot_pair(p: Pair, beta, eps, extra):
    delta = jnp.sort(p.chosen_logratios) - jnp.sort(p.rejected_logratios)
    return _smoothed_sigmoid(beta * delta, eps)


def _apo_zero(p: Pair, beta, eps, extra):
    return (1.0 - jax.nn.sigmoid(beta * p.chosen_logratios)) + jax.nn.sigmoid(beta * p.rejected_logratios)


def _apo_down(p: Pair, beta, eps, extra):
    return jax.nn.sigmoid(beta * p.chosen_logratios) + (1.0 - jax.nn.sigmoid(beta * p.h))


def _discopop(p: Pair, beta, eps, extra):
    z = beta * p.h
    tau = extra["discopop_tau"]
    # σ(z/τ)·e^{−z} in log space: TRL's direct product is inf·0 = NaN for very negative z.
    return -log_sigmoid(z) * jax.nn.sigmoid(-z / tau) + jnp.exp(log_sigmoid(z / tau) - z)


def _sigmoid_norm(p: Pair, beta, eps, extra):
    return -log_sigmoid(beta * p.normalised_h("sigmoid_norm"))


LossFn = Callable[[Pair, jax.Array, jax.Array, dict], jax.Array]
LOSS_TYPES: dict[str, LossFn] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "robust": _robust,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_pair": _aot_pair,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sigmoid_norm": _sigmoid_norm,
}


def as_float32(x):
    return None if x is None else jnp.asarray(x, jnp.float32)


def pair_of(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths):
    """The float32 ``Pair`` of these log-probs (``ref_*=None``: reference-free)."""
    chosen_logps, rejected_logps = as_float32(chosen_logps), as_float32(rejected_logps)
    # Reference-free mode: no reference model means log π_ref = 0.
    ref_c = jnp.zeros_like(chosen_logps) if ref_chosen_logps is None else as_float32(ref_chosen_logps)
    ref_r = jnp.zeros_like(rejected_logps) if ref_rejected_logps is None else as_float32(ref_rejected_logps)
    return Pair(chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_c,
                ref_rejected_logps=ref_r, chosen_lengths=as_float32(chosen_lengths),
                rejected_lengths=as_float32(rejected_lengths))


def check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {sorted(LOSS_TYPES)}")


def preference_loss(
    loss_type: str,
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None,
    ref_rejected_logps: jax.Array | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    **extra,
) -> jax.Array:
    """Per-example offline preference loss ``[batch]`` of the named type (TRL's definitions).

    ``ref_*_logps=None`` is reference-free mode. Extra keyword arguments: ``discopop_tau`` (0.05),
    ``bco_delta`` (0.0; a running mean of rewards, as older TRL used).
    """
    check_loss_type(loss_type)
    unknown = sorted(set(extra) - set(_EXTRA_ARGS))
    if unknown:
        raise TypeError(f"unknown preference_loss arguments {unknown}; valid extras: {sorted(_EXTRA_ARGS)}")
    pair = pair_of(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths)
    return LOSS_TYPES[loss_type](pair, jnp.float32(beta), jnp.float32(label_smoothing), {**_EXTRA_ARGS, **extra})


def masked_mean(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean over entries where ``mask`` is true (0 when none is)."""
    if mask is None:
        return jnp.mean(x)
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def preference_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, mask=None):
    """TRL-named metrics (``rewards/*`` with implicit reward β·log(π/π_ref), ``logps/*``)."""
    p = pair_of(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, None, None)
    chosen_rewards, rejected_rewards = beta * p.chosen_logratios, beta * p.rejected_logratios
    return {
        "rewards/chosen": masked_mean(chosen_rewards, mask),
        "rewards/rejected": masked_mean(rejected_rewards, mask),
        "rewards/margins": masked_mean(chosen_rewards - rejected_rewards, mask),
        "rewards/accuracies": masked_mean((chosen_rewards > rejected_rewards).astype(jnp.float32), mask),
        "logps/chosen": masked_mean(p.chosen_logps, mask),
        "logps/rejected": masked_mean(p.rejected_logps, mask),
    }
