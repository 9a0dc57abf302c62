"""SAIL's per-route objective (../shared/SAIL.md) as named terms: pure, jit-able, float32.

Per example, on its route (``route [batch]`` of ``ROUTE_*``), with ℓ = log σ(β·h):

  preference  offline: ``preference_loss(loss_type)``; DP / PP / PR: ``−ℓ`` (or, with
              ``online_loss_type``, that loss: online IPO, hinge, ...)
  self_label  DP: ``−ρ·½ℓ²``;  PP: ``−λ·½ℓ²``          (gradient through the policy's own labels)
  score       PP: ``−λ·S`` (``lam_score`` apart);  PR: ``−γ·S``, S = sg(ℓ − b)·(logπ(y_w) + logπ(y_l))
              (gradient through the sampling of the responses; or the released code's hook)
  revkl       PP / PR: ``α·½·sg(d_w − d_l)·(logπ(y_w) − logπ(y_l))``, d = logπ(y) − logπ_ref(y)
              (SAIL-RevKL: the gradient of α·KL(π‖π_ref) on the pair's two samples)
  xpo         PP / PR with the reference as the opponent: ``α_xpo·logπ(y_ref)`` (XPO's exploration
              term: lowers the policy's likelihood of the reference's sample; only when α_xpo > 0)

Nash-MD (the opponent sampled from the geometric mixture of π and π_ref) replaces the PR rows'
preference term by TRL's Nash-MD loss ``β·Σ_t sg(d_t)·logπ(y_t) − (P − ½)·logπ(y)`` on the policy's
sample y, d_t its per-token log-ratio and P = σ(r(y) − r(y')) its probability of beating the mixture's y'.

The loss is their sum; keeping them apart lets the loop log what each term contributes.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from sail_jax.losses import (as_float32, check_loss_type, log_sigmoid, masked_mean, pair_of, preference_loss,
                             preference_metrics)

ROUTE_OFFLINE, ROUTE_DP, ROUTE_PP, ROUTE_PR = 0, 1, 2, 3
ROUTE_NAMES = ("offline", "dp", "pp", "pr")
NUM_ROUTES = len(ROUTE_NAMES)
BASELINES = ("none", "batch_mean", "running")
SCORE_TERMS = ("unbiased", "released_code")
TERMS = ("preference", "self_label", "score", "revkl")  # and "xpo" when its coefficient is nonzero


def implicit_log_likelihood(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """ℓ = log σ(β·h): the label's log-likelihood under the policy's Bradley–Terry model."""
    p = pair_of(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, None, None)
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
    batch_mean = (one_hot * jax.lax.stop_gradient(as_float32(ell))[:, None]).sum(0) / jnp.maximum(count, 1.0)
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


def sail_terms(
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
    lam_score: float | None = None,
    revkl: float = 0.0,
    xpo_alpha: float = 0.0,
    opponent_chosen: jax.Array | None = None,
    baseline: str = "batch_mean",
    score_term: str = "unbiased",
    released_code_scale: float | jax.Array = 1.0,
    loss_type: str = "sigmoid",
    online_loss_type: str = "",
    label_smoothing: float = 0.0,
    score_chosen_logps: jax.Array | None = None,
    score_rejected_logps: jax.Array | None = None,
    mask: jax.Array | None = None,
    baseline_state: RunningBaseline | None = None,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    nash_probability: jax.Array | None = None,
    nash_weighted_logps: jax.Array | None = None,
    **extra,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The per-example terms ``{name: [batch]}`` of ``TERMS`` (zero where ``mask`` is false) and metrics.

    ``lam_score`` is PP's coefficient on S when it should differ from λ on ½ℓ² (an ablation knob;
    the derivation has one λ). ``score_*_logps`` (e.g. at the sampling temperature) carry S's and
    RevKL's ∇logπ when given.
    ``revkl`` is α: its term's gradient is an unbiased estimate of α·∇KL(π‖π_ref) when the pair's two
    responses are independent samples of π (leave-one-out: each sample's baseline is the other's
    log-ratio; zero on identical pairs, so dropping them biases nothing).
    ``score_term="released_code"`` replaces S by the authors' hook: ``−coef·sg(ℓ)/sg(logπ(y))`` added
    to each ∂/∂logπ(y), multiplied by ``released_code_scale`` (their per-device micro-batch size x
    gradient-accumulation steps reproduces their batch gradient, see ``objectives``).
    ``online_loss_type`` (empty: SAIL's −ℓ) is the preference loss of the DP/PP/PR rows, e.g. ``ipo``
    for online IPO; ½ℓ², S and the labels keep the Bradley–Terry ℓ.
    ``xpo_alpha`` > 0 adds XPO's term on the sampled rows, whose pair is the policy's sample against
    the reference's; ``opponent_chosen [batch]`` says whether the chosen response is the reference's.
    ``nash_probability [batch]`` (Nash-MD's P; the chosen response is the policy's sample) with
    ``nash_weighted_logps`` (``objectives.nash_md_weighted_logps``) turns the PR rows' preference term
    into Nash-MD's loss.
    """
    check_loss_type(loss_type)
    if online_loss_type:
        check_loss_type(online_loss_type)
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; valid: {list(BASELINES)}")
    if score_term not in SCORE_TERMS:
        raise ValueError(f"unknown score_term {score_term!r}; valid: {list(SCORE_TERMS)}")
    p = pair_of(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths)
    route = jnp.asarray(route, jnp.int32)
    sg = jax.lax.stop_gradient
    ell = log_sigmoid(beta * p.h)
    score_c = p.chosen_logps if score_chosen_logps is None else as_float32(score_chosen_logps)
    score_r = p.rejected_logps if score_rejected_logps is None else as_float32(score_rejected_logps)
    valid = jnp.ones_like(ell, jnp.bool_) if mask is None else mask.astype(jnp.bool_)
    is_dp, is_pp, is_pr = route == ROUTE_DP, route == ROUTE_PP, route == ROUTE_PR
    sampled = is_pp | is_pr

    half_sq = 0.5 * ell**2
    pp_score_coef = lam if lam_score is None else lam_score
    score_coef = jnp.where(is_pp, pp_score_coef, jnp.where(is_pr, gamma, 0.0)).astype(jnp.float32)
    if score_term == "unbiased":
        b = sg(_baseline(baseline, ell, route, mask, baseline_state))
        score = sg(ell - b) * (score_c + score_r)
        score_weight = jnp.abs(sg(ell - b))
    else:
        b = jnp.zeros_like(ell)
        sg_ell = sg(ell)
        score = sg(as_float32(released_code_scale)) * (
            _released_code_score(score_c, sg_ell) + _released_code_score(score_r, sg_ell))
        score_weight = 0.5 * jnp.abs(sg(sg_ell / _safe_logp(score_c) + sg_ell / _safe_logp(score_r)))
    def pref(kind, lengths):
        return preference_loss(kind, p.chosen_logps, p.rejected_logps, p.ref_chosen_logps, p.ref_rejected_logps,
                               beta=beta, label_smoothing=label_smoothing, chosen_lengths=lengths[0],
                               rejected_lengths=lengths[1], **extra)

    offline = pref(loss_type, (p.chosen_lengths, p.rejected_lengths))
    # Online rows use sequence-level log-ratios, as TRL's online trainers do (their IPO is not
    # length-normalised, unlike its offline DPO's); only a loss normalised by definition gets lengths.
    online_lengths = (p.chosen_lengths, p.rejected_lengths) if online_loss_type == "sigmoid_norm" else (None, None)
    online = pref(online_loss_type, online_lengths) if online_loss_type else -ell
    if nash_probability is not None:
        if nash_weighted_logps is None:
            raise ValueError("nash_probability needs nash_weighted_logps (objectives.nash_md_weighted_logps)")
        nash_score = (as_float32(nash_probability) - 0.5) * p.chosen_logps
        online = jnp.where(is_pr, beta * as_float32(nash_weighted_logps) - nash_score, online)
    self_label_coef = jnp.where(is_dp, rho, jnp.where(is_pp, lam, 0.0)).astype(jnp.float32)
    # RevKL on the sampled routes: d = log(π_T/π_ref) at the sampling temperature T (exact at T = 1).
    d_c, d_r = score_c - p.ref_chosen_logps, score_r - p.ref_rejected_logps
    revkl_coef = jnp.where(sampled, revkl, 0.0).astype(jnp.float32)
    terms = {
        "preference": jnp.where(route == ROUTE_OFFLINE, offline, online),
        "self_label": -self_label_coef * half_sq,
        "score": -score_coef * score,
        "revkl": revkl_coef * 0.5 * sg(d_c - d_r) * (score_c - score_r),
    }
    if xpo_alpha:
        if opponent_chosen is None:
            raise ValueError("xpo_alpha > 0 needs opponent_chosen (the pair's reference sample, per row)")
        opponent_logps = jnp.where(jnp.asarray(opponent_chosen).astype(jnp.bool_), p.chosen_logps, p.rejected_logps)
        terms["xpo"] = jnp.where(sampled, xpo_alpha * opponent_logps, 0.0)
    terms = {k: jnp.where(valid, v, 0.0) for k, v in terms.items()}

    metrics = preference_metrics(p.chosen_logps, p.rejected_logps, p.ref_chosen_logps, p.ref_rejected_logps,
                                 beta=beta, mask=valid)
    per_example = sum(terms.values())
    abs_beta_h = jnp.abs(sg(beta * p.h))
    for i, name in enumerate(ROUTE_NAMES):
        in_route = valid & (route == i)
        metrics[f"route/{name}_frac"] = masked_mean(in_route.astype(jnp.float32), None)
        metrics[f"loss/{name}"] = masked_mean(per_example, in_route)
        if i != ROUTE_OFFLINE:
            metrics[f"sail/abs_beta_h/{name}"] = masked_mean(abs_beta_h, in_route)
    sail_routes = valid & (route != ROUTE_OFFLINE)
    self_labelled = valid & (is_dp | is_pp)
    scored = valid & sampled
    # KL(π‖π_ref) on the training samples (temperature 1): the mean log-ratio of the sampled responses.
    train_kl = masked_mean(sg(0.5 * (p.chosen_logratios + p.rejected_logratios)), scored)
    metrics.update({
        "sail/dpo_term": masked_mean(online, sail_routes),
        "sail/self_label_term": masked_mean(sg(half_sq), self_labelled),
        "sail/score_weight": masked_mean(score_weight, scored),
        "sail/baseline": masked_mean(b, scored),
        "sail/valid_frac": masked_mean(valid.astype(jnp.float32), None),
        "sail/train_kl": train_kl,
        "sail/revkl": jnp.float32(revkl) * train_kl,
    })
    if xpo_alpha:
        metrics["xpo/opponent_logps"] = masked_mean(sg(opponent_logps), scored)
    if nash_probability is not None:
        nash_rows = valid & is_pr
        metrics["nash/probability"] = masked_mean(as_float32(nash_probability), nash_rows)
        metrics["nash/score"] = masked_mean(sg(nash_score), nash_rows)
        metrics["nash/kl"] = masked_mean(sg(p.chosen_logratios), nash_rows)
    return terms, metrics


def sail_loss(*args, **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example SAIL loss ``[batch]`` (the sum of ``sail_terms``; zero where masked) and metrics."""
    terms, metrics = sail_terms(*args, **kwargs)
    return sum(terms.values()), metrics
