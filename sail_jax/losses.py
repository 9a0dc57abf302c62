"""Preference losses (TRL's family, by name) and SAIL's per-route objective. Pure, jit-able, float32.

All functions take per-sequence log-probs ``[batch]`` (sums over response tokens) of the policy and
the reference and return per-example values; the caller averages. Notation follows ../SAIL.md:
``h = (logπ(y_w) − logπ_ref(y_w)) − (logπ(y_l) − logπ_ref(y_l))`` and ``ℓ = log σ(β·h)``.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

ROUTE_OFFLINE, ROUTE_DP, ROUTE_PP, ROUTE_PR = 0, 1, 2, 3
ROUTE_NAMES = ("offline", "dp", "pp", "pr")
NUM_ROUTES = len(ROUTE_NAMES)
BASELINES = ("none", "batch_mean", "running")
SCORE_TERMS = ("unbiased", "released_code")
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


def _f32(x):
    return None if x is None else jnp.asarray(x, jnp.float32)


def _pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths):
    chosen_logps, rejected_logps = _f32(chosen_logps), _f32(rejected_logps)
    # Reference-free mode: no reference model means log π_ref = 0.
    ref_c = jnp.zeros_like(chosen_logps) if ref_chosen_logps is None else _f32(ref_chosen_logps)
    ref_r = jnp.zeros_like(rejected_logps) if ref_rejected_logps is None else _f32(ref_rejected_logps)
    return Pair(chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_c,
                ref_rejected_logps=ref_r, chosen_lengths=_f32(chosen_lengths), rejected_lengths=_f32(rejected_lengths))


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
    pair = _pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths)
    return LOSS_TYPES[loss_type](pair, jnp.float32(beta), jnp.float32(label_smoothing), {**_EXTRA_ARGS, **extra})


def masked_mean(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean over entries where ``mask`` is true (0 when none is)."""
    if mask is None:
        return jnp.mean(x)
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def preference_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, mask=None):
    """TRL-named metrics (``rewards/*`` with implicit reward β·log(π/π_ref), ``logps/*``)."""
    p = _pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, None, None)
    chosen_rewards, rejected_rewards = beta * p.chosen_logratios, beta * p.rejected_logratios
    return {
        "rewards/chosen": masked_mean(chosen_rewards, mask),
        "rewards/rejected": masked_mean(rejected_rewards, mask),
        "rewards/margins": masked_mean(chosen_rewards - rejected_rewards, mask),
        "rewards/accuracies": masked_mean((chosen_rewards > rejected_rewards).astype(jnp.float32), mask),
        "logps/chosen": masked_mean(p.chosen_logps, mask),
        "logps/rejected": masked_mean(p.rejected_logps, mask),
    }


# ------------------------------------------------------------------------------------------ SAIL
def implicit_log_likelihood(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """ℓ = log σ(β·h): the label's log-likelihood under the policy's Bradley–Terry model."""
    p = _pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, None, None)
    return log_sigmoid(beta * p.h)


@chex.dataclass(frozen=True)
class RunningBaseline:
    """Per-route exponential moving average of ℓ, the ``running`` score-function baseline."""

    mean: jax.Array  # [NUM_ROUTES]
    initialized: jax.Array  # [NUM_ROUTES] bool

    @classmethod
    def init(cls) -> "RunningBaseline":
        return cls(mean=jnp.zeros(NUM_ROUTES, jnp.float32), initialized=jnp.zeros(NUM_ROUTES, jnp.bool_))


def _route_one_hot(route, mask):
    valid = jnp.ones(route.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return jax.nn.one_hot(route, NUM_ROUTES, dtype=jnp.float32) * valid[:, None]  # [batch, routes]


def update_running_baseline(state: RunningBaseline, ell, route, mask=None, *, decay: float = 0.9) -> RunningBaseline:
    """Fold this batch's per-route mean of ℓ into the moving average (first batch initialises it)."""
    one_hot = _route_one_hot(route, mask)
    count = one_hot.sum(0)
    batch_mean = (one_hot * jax.lax.stop_gradient(_f32(ell))[:, None]).sum(0) / jnp.maximum(count, 1.0)
    seen = count > 0
    blended = jnp.where(state.initialized, decay * state.mean + (1.0 - decay) * batch_mean, batch_mean)
    return RunningBaseline(mean=jnp.where(seen, blended, state.mean), initialized=state.initialized | seen)


def _baseline(kind, ell, route, mask, state):
    """Per-example baseline b_i, independent of example i's own sample."""
    if kind == "none":
        return jnp.zeros_like(ell)
    if kind == "batch_mean":
        one_hot = _route_one_hot(route, mask)  # masked examples are all-zero rows
        totals, counts = (one_hot * ell[:, None]).sum(0), one_hot.sum(0)
        own = jax.nn.one_hot(route, NUM_ROUTES, dtype=jnp.float32)
        valid = one_hot.sum(1)
        total_i = own @ totals - valid * ell  # leave example i out
        others = own @ counts - valid
        return jnp.where(others > 0, total_i / jnp.maximum(others, 1.0), 0.0)
    if state is None:
        raise ValueError("baseline='running' needs baseline_state (see RunningBaseline.init)")
    return jnp.where(state.initialized, state.mean, 0.0)[route]


def _safe_logp(logp):
    return jnp.minimum(logp, -1e-6)  # log-probs are ≤ 0; keeps ℓ/logπ finite at logπ = 0


@jax.custom_vjp
def _released_code_score(logp, ell):
    """Value 0; its derivative w.r.t. ``logp`` is ``ℓ/logπ`` (where S's is ``ℓ − b``), as the
    released SAIL code weights ∇logπ(y) "as if logπ were a probability"."""
    return jnp.zeros_like(logp)


def _released_fwd(logp, ell):
    return jnp.zeros_like(logp), (logp, ell)


def _released_bwd(res, g):
    logp, ell = res
    return g * ell / _safe_logp(logp), jnp.zeros_like(ell)


_released_code_score.defvjp(_released_fwd, _released_bwd)


def sail_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None,
    ref_rejected_logps: jax.Array | None,
    route: jax.Array,
    *,
    beta: float,
    rho: float,
    lam: float,
    gamma: float,
    baseline: str = "batch_mean",
    score_term: str = "unbiased",
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    score_chosen_logps: jax.Array | None = None,
    score_rejected_logps: jax.Array | None = None,
    mask: jax.Array | None = None,
    baseline_state: RunningBaseline | None = None,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    **extra,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example SAIL loss ``[batch]`` (zero where ``mask`` is false) and scalar metrics.

    Per route (``route [batch]`` of ``ROUTE_*``), exactly ../SAIL.md's table:
      offline: ``preference_loss(loss_type)``;  DP: ``−ℓ − ρ·½ℓ²``;
      PP: ``−ℓ − λ·½ℓ² − λ·S``;  PR: ``−ℓ − γ·S``;
    with ``S = sg(ℓ − b)·(logπ(y_w) + logπ(y_l))`` on ``score_*_logps`` when given (e.g. at the
    sampling temperature). ``score_term="released_code"`` replaces S by the released code's gradient
    (``−coef·sg(ℓ)/sg(logπ(y))`` added to each ∂/∂logπ(y)); a compatibility mode, not the estimator.
    """
    check_loss_type(loss_type)
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; valid: {list(BASELINES)}")
    if score_term not in SCORE_TERMS:
        raise ValueError(f"unknown score_term {score_term!r}; valid: {list(SCORE_TERMS)}")
    p = _pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths)
    route = jnp.asarray(route, jnp.int32)
    ell = log_sigmoid(beta * p.h)
    score_c = p.chosen_logps if score_chosen_logps is None else _f32(score_chosen_logps)
    score_r = p.rejected_logps if score_rejected_logps is None else _f32(score_rejected_logps)

    half_sq = 0.5 * ell**2
    is_pp, is_pr = route == ROUTE_PP, route == ROUTE_PR
    score_coef = jnp.where(is_pp, lam, jnp.where(is_pr, gamma, 0.0)).astype(jnp.float32)
    if score_term == "unbiased":
        b = jax.lax.stop_gradient(_baseline(baseline, ell, route, mask, baseline_state))
        score = jax.lax.stop_gradient(ell - b) * (score_c + score_r)
        score_weight = jnp.abs(jax.lax.stop_gradient(ell - b))
    else:
        b = jnp.zeros_like(ell)
        sg_ell = jax.lax.stop_gradient(ell)
        score = _released_code_score(score_c, sg_ell) + _released_code_score(score_r, sg_ell)
        score_weight = 0.5 * jnp.abs(jax.lax.stop_gradient(
            sg_ell / _safe_logp(score_c) + sg_ell / _safe_logp(score_r)))
    offline = preference_loss(
        loss_type, p.chosen_logps, p.rejected_logps, p.ref_chosen_logps, p.ref_rejected_logps, beta=beta,
        label_smoothing=label_smoothing, chosen_lengths=p.chosen_lengths, rejected_lengths=p.rejected_lengths,
        **extra)
    self_label_coef = jnp.where(route == ROUTE_DP, rho, jnp.where(is_pp, lam, 0.0)).astype(jnp.float32)
    online = -ell - self_label_coef * half_sq - score_coef * score
    per_example = jnp.where(route == ROUTE_OFFLINE, offline, online)
    valid = jnp.ones_like(ell, jnp.bool_) if mask is None else mask.astype(jnp.bool_)
    per_example = jnp.where(valid, per_example, 0.0)

    metrics = preference_metrics(p.chosen_logps, p.rejected_logps, p.ref_chosen_logps, p.ref_rejected_logps,
                                 beta=beta, mask=valid)
    for i, name in enumerate(ROUTE_NAMES):
        in_route = valid & (route == i)
        metrics[f"route/{name}_frac"] = masked_mean(in_route.astype(jnp.float32), None)
        metrics[f"loss/{name}"] = masked_mean(per_example, in_route)
    sail_routes = valid & (route != ROUTE_OFFLINE)
    self_labelled = valid & ((route == ROUTE_DP) | is_pp)
    scored = valid & (is_pp | is_pr)
    metrics.update({
        "sail/dpo_term": masked_mean(-ell, sail_routes),
        "sail/self_label_term": masked_mean(jax.lax.stop_gradient(half_sq), self_labelled),
        "sail/score_weight": masked_mean(score_weight, scored),
        "sail/baseline": masked_mean(b, scored),
        "sail/valid_frac": masked_mean(valid.astype(jnp.float32), None),
    })
    return per_example, metrics
