"""Preference losses against closed forms; SAIL's terms against analytic gradients and an exact J(θ)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sail_jax.losses import (
    LOSS_TYPES,
    ROUTE_DP,
    ROUTE_OFFLINE,
    ROUTE_PP,
    ROUTE_PR,
    RunningBaseline,
    implicit_log_likelihood,
    preference_loss,
    preference_metrics,
    sail_loss,
    update_running_baseline,
)

BETA = 0.1


def softplus(x):
    return math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


EPS_EXO = 1e-3
AT_ZERO = {
    "sigmoid": math.log(2), "hinge": 1.0, "ipo": 1 / (4 * BETA**2), "robust": math.log(2),
    "exo_pair": math.log(0.5) - 0.5 * math.log1p(-EPS_EXO) - 0.5 * math.log(EPS_EXO),
    "nca_pair": 2 * math.log(2), "bco_pair": 2 * math.log(2), "sppo_hard": 1 / (2 * BETA**2),
    "aot": math.log(2), "aot_pair": math.log(2), "apo_zero": 1.0, "apo_down": 1.0,
    "discopop": 0.5 * math.log(2) + 0.5, "sigmoid_norm": math.log(2),
}

# A non-trivial point: chosen log-ratio +1, rejected log-ratio -2, h = 3, β·h = 0.3; lengths 5 and 8.
POINT = dict(chosen=-10.0, rejected=-14.0, ref_chosen=-11.0, ref_rejected=-12.0, len_c=5.0, len_r=8.0)
NORM_H = 1 / 5 - (-2 / 8)  # length-normalised margin, 0.45
AT_POINT = {
    "sigmoid": softplus(-0.3), "hinge": 0.7, "ipo": (NORM_H - 5) ** 2,
    "robust": softplus(-0.3),
    "exo_pair": sig(0.3) * (-softplus(-0.3) - math.log1p(-EPS_EXO)) + sig(-0.3) * (-softplus(0.3) - math.log(EPS_EXO)),
    "nca_pair": softplus(-0.1) + 0.5 * softplus(0.1) + 0.5 * softplus(-0.2),
    "bco_pair": softplus(-0.1) + softplus(-0.2), "sppo_hard": (1 - 5) ** 2 + (-2 + 5) ** 2,
    "aot": softplus(-0.3), "aot_pair": softplus(-0.3),
    "apo_zero": (1 - sig(0.1)) + sig(-0.2), "apo_down": sig(0.1) + 1 - sig(0.3),
    "discopop": softplus(-0.3) * (1 - sig(0.3 / 0.05)) + math.exp(-0.3) * sig(0.3 / 0.05),
    "sigmoid_norm": softplus(-BETA * NORM_H),
}


def _arr(x, n=3):
    return jnp.full((n,), x, jnp.float32)


def test_every_registered_loss_has_closed_form_checks():
    assert set(AT_ZERO) == set(LOSS_TYPES) == set(AT_POINT)


class TestClosedForms(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_closed_forms(self):
        for loss_type in sorted(LOSS_TYPES):
            fn = self.variant(lambda c, r, rc, rr, lc, lr, lt=loss_type: preference_loss(
                lt, c, r, rc, rr, beta=BETA, chosen_lengths=lc, rejected_lengths=lr))
            zero = fn(_arr(-7.0), _arr(-7.0), _arr(-7.0), _arr(-7.0), _arr(4.0), _arr(6.0))
            np.testing.assert_allclose(zero, AT_ZERO[loss_type], rtol=1e-5, err_msg=loss_type)
            p = POINT
            point = fn(_arr(p["chosen"]), _arr(p["rejected"]), _arr(p["ref_chosen"]), _arr(p["ref_rejected"]),
                       _arr(p["len_c"]), _arr(p["len_r"]))
            np.testing.assert_allclose(point, AT_POINT[loss_type], rtol=1e-5, err_msg=loss_type)

    @chex.variants(with_jit=True, without_jit=True)
    def test_label_smoothing_and_ipo_without_lengths(self):
        c, r, rc, rr = (_arr(POINT[k]) for k in ("chosen", "rejected", "ref_chosen", "ref_rejected"))
        cdpo = self.variant(lambda *a: preference_loss("sigmoid", *a, beta=BETA, label_smoothing=0.1))(c, r, rc, rr)
        np.testing.assert_allclose(cdpo, 0.9 * softplus(-0.3) + 0.1 * softplus(0.3), rtol=1e-5)
        robust = self.variant(lambda *a: preference_loss("robust", *a, beta=BETA, label_smoothing=0.1))(c, r, rc, rr)
        np.testing.assert_allclose(robust, (0.9 * softplus(-0.3) - 0.1 * softplus(0.3)) / 0.8, rtol=1e-5)
        ipo = self.variant(lambda *a: preference_loss("ipo", *a, beta=BETA))(c, r, rc, rr)
        np.testing.assert_allclose(ipo, (3 - 5) ** 2, rtol=1e-5)


def test_aot_sorts_margins_across_the_batch():
    # Policy margins [1, 5], reference margins [3, -1]: sorted, both deltas are 2.
    loss = preference_loss("aot", jnp.array([1.0, 5.0]), jnp.zeros(2), jnp.array([3.0, -1.0]), jnp.zeros(2), beta=1.0)
    np.testing.assert_allclose(loss, [softplus(-2.0)] * 2, rtol=1e-6)


def test_unknown_loss_type_and_extras_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown loss_type 'dpo'; valid: \['aot', 'aot_pair'"):
        preference_loss("dpo", _arr(0), _arr(0), _arr(0), _arr(0), beta=BETA)
    with pytest.raises(TypeError, match=r"valid extras: \['bco_delta', 'discopop_tau'\]"):
        preference_loss("sigmoid", _arr(0), _arr(0), _arr(0), _arr(0), beta=BETA, tau=1.0)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        preference_loss("sigmoid_norm", _arr(0), _arr(0), _arr(0), _arr(0), beta=BETA)


def test_reference_free_mode_equals_zero_reference():
    c, r = jnp.array([-3.0, -5.0]), jnp.array([-4.0, -2.0])
    for loss_type in ("sigmoid", "ipo", "nca_pair"):
        np.testing.assert_allclose(preference_loss(loss_type, c, r, None, None, beta=BETA),
                                   preference_loss(loss_type, c, r, jnp.zeros(2), jnp.zeros(2), beta=BETA))


def test_preference_metrics_match_trl_definitions():
    m = preference_metrics(jnp.array([-1.0, -3.0]), jnp.array([-2.0, -2.0]), jnp.zeros(2), jnp.zeros(2), beta=0.5)
    np.testing.assert_allclose(m["rewards/chosen"], -1.0)
    np.testing.assert_allclose(m["rewards/rejected"], -1.0)
    np.testing.assert_allclose(m["rewards/margins"], 0.0)
    np.testing.assert_allclose(m["rewards/accuracies"], 0.5)  # strict >: the tie does not count
    np.testing.assert_allclose(m["logps/chosen"], -2.0)


# ---------------------------------------------------------------------------------- SAIL gradients
ROUTES = jnp.array([ROUTE_OFFLINE, ROUTE_OFFLINE, ROUTE_DP, ROUTE_DP, ROUTE_DP, ROUTE_PP, ROUTE_PP, ROUTE_PP,
                    ROUTE_PR, ROUTE_PR, ROUTE_PR])
COEF = dict(beta=0.5, rho=0.3, lam=0.2, gamma=0.7)


def _inputs(seed=0):
    rng = np.random.RandomState(seed)
    n = len(ROUTES)
    return tuple(jnp.asarray(-rng.uniform(2, 12, n), jnp.float32) for _ in range(4))


def _expected_baseline(kind, ell, routes, state=None):
    ell, routes = np.asarray(ell), np.asarray(routes)
    if kind == "none":
        return np.zeros_like(ell)
    if kind == "running":
        return np.where(np.asarray(state.initialized), np.asarray(state.mean), 0.0)[routes]
    out = np.zeros_like(ell)
    for i in range(len(ell)):
        others = [j for j in range(len(ell)) if j != i and routes[j] == routes[i]]
        out[i] = np.mean(ell[others]) if others else 0.0
    return out


def _analytic_grads(c, r, rc, rr, b, *, beta, rho, lam, gamma, released=False):
    h = (c - rc) - (r - rr)
    ell = np.log(1 / (1 + np.exp(-beta * h)))
    dell = beta / (1 + np.exp(beta * h))  # dℓ/dh = β·σ(−βh)
    routes = np.asarray(ROUTES)
    label_coef = np.select([routes == ROUTE_DP, routes == ROUTE_PP], [rho, lam], 0.0)
    score_coef = np.select([routes == ROUTE_PP, routes == ROUTE_PR], [lam, gamma], 0.0)
    if released:
        w_c, w_r = ell / c, ell / r
    else:
        w_c = w_r = ell - b
    grad_c = -(1 + label_coef * ell) * dell - score_coef * w_c
    grad_r = (1 + label_coef * ell) * dell - score_coef * w_r
    return grad_c, grad_r, ell


@pytest.mark.parametrize("baseline", ["none", "batch_mean", "running"])
def test_sail_loss_gradient_equals_analytic_for_every_route(baseline):
    c, r, rc, rr = _inputs()
    state = RunningBaseline(mean=jnp.array([0.0, -0.4, -0.9, -0.2]), initialized=jnp.array([False, True, True, False]))

    def total(c, r):
        loss, _ = sail_loss(c, r, rc, rr, ROUTES, baseline=baseline, baseline_state=state, **COEF)
        return loss.sum()

    gc, gr = jax.jit(jax.grad(total, argnums=(0, 1)))(c, r)
    ell = implicit_log_likelihood(c, r, rc, rr, beta=COEF["beta"])
    b = _expected_baseline(baseline, ell, ROUTES, state)
    ec, er, _ = _analytic_grads(*(np.asarray(x, np.float64) for x in (c, r, rc, rr)), b, **COEF)
    offline = np.asarray(ROUTES) == ROUTE_OFFLINE
    dell = COEF["beta"] / (1 + np.exp(COEF["beta"] * (np.asarray(c - rc) - np.asarray(r - rr))))
    ec[offline], er[offline] = -dell[offline], dell[offline]  # offline = plain DPO (sigmoid)
    np.testing.assert_allclose(gc, ec, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gr, er, rtol=1e-4, atol=1e-6)


def test_score_term_uses_score_logps_when_given():
    c, r, rc, rr = _inputs()
    sc, sr = c * 0.8, r * 0.8  # e.g. log-probs at the sampling temperature

    def total(c, r, sc, sr):
        return sail_loss(c, r, rc, rr, ROUTES, baseline="none", score_chosen_logps=sc, score_rejected_logps=sr,
                         **COEF)[0].sum()

    gc, gr, gsc, gsr = jax.grad(total, argnums=(0, 1, 2, 3))(c, r, sc, sr)
    ell = np.asarray(implicit_log_likelihood(c, r, rc, rr, beta=COEF["beta"]))
    score_coef = np.select([np.asarray(ROUTES) == ROUTE_PP, np.asarray(ROUTES) == ROUTE_PR], [COEF["lam"], COEF["gamma"]], 0)
    np.testing.assert_allclose(gsc, -score_coef * ell, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gsr, -score_coef * ell, rtol=1e-5, atol=1e-7)
    # The policy log-probs now carry only the DPO and self-labelling parts.
    ec, er, _ = _analytic_grads(*(np.asarray(x, np.float64) for x in (c, r, rc, rr)), ell, **COEF)
    sail = np.asarray(ROUTES) != ROUTE_OFFLINE
    np.testing.assert_allclose(np.asarray(gc)[sail], ec[sail], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gr)[sail], er[sail], rtol=1e-4, atol=1e-6)


def test_released_code_mode_gradient_is_its_stated_formula():
    c, r, rc, rr = _inputs(seed=1)

    def total(c, r):
        return sail_loss(c, r, rc, rr, ROUTES, score_term="released_code", **COEF)[0].sum()

    loss, _ = sail_loss(c, r, rc, rr, ROUTES, score_term="released_code", **COEF)
    unbiased_value, _ = sail_loss(c, r, rc, rr, ROUTES, baseline="none", **COEF)
    gc, gr = jax.grad(total, argnums=(0, 1))(c, r)
    ec, er, ell = _analytic_grads(*(np.asarray(x, np.float64) for x in (c, r, rc, rr)), None, released=True, **COEF)
    sail = np.asarray(ROUTES) != ROUTE_OFFLINE
    np.testing.assert_allclose(np.asarray(gc)[sail], ec[sail], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gr)[sail], er[sail], rtol=1e-4, atol=1e-6)
    # Its value is −ℓ − coef·½ℓ² (the score term contributes gradient only).
    half = 0.5 * ell**2
    routes = np.asarray(ROUTES)
    expected = -ell - np.select([routes == ROUTE_DP, routes == ROUTE_PP], [COEF["rho"], COEF["lam"]], 0) * half
    np.testing.assert_allclose(np.asarray(loss)[sail], expected[sail], rtol=1e-5)
    assert not np.allclose(loss, unbiased_value)


def test_zero_coefficients_reduce_every_route_to_dpo():
    c, r, rc, rr = _inputs(seed=2)
    zero = dict(beta=0.5, rho=0.0, lam=0.0, gamma=0.0)
    dpo = preference_loss("sigmoid", c, r, rc, rr, beta=0.5)
    sail, _ = sail_loss(c, r, rc, rr, ROUTES, **zero)
    np.testing.assert_allclose(sail, dpo, rtol=1e-6)
    g_sail = jax.grad(lambda c: sail_loss(c, r, rc, rr, ROUTES, **zero)[0].sum())(c)
    g_dpo = jax.grad(lambda c: preference_loss("sigmoid", c, r, rc, rr, beta=0.5).sum())(c)
    np.testing.assert_allclose(g_sail, g_dpo, rtol=1e-6)


def test_batch_mean_baseline_leaves_the_example_out_and_respects_the_mask():
    ell = jnp.array([-1.0, -2.0, -3.0, -4.0])
    routes = jnp.array([ROUTE_PP, ROUTE_PP, ROUTE_PP, ROUTE_PR])
    mask = jnp.array([True, True, False, True])
    from sail_jax.losses import _baseline

    b = _baseline("batch_mean", ell, routes, mask, None)
    np.testing.assert_allclose(b, [-2.0, -1.0, -1.5, 0.0])  # masked example 2 is never anyone's baseline


def test_running_baseline_initialises_then_averages_per_route():
    state = RunningBaseline.init()
    state = update_running_baseline(state, jnp.array([-1.0, -3.0]), jnp.array([ROUTE_PP, ROUTE_PP]), decay=0.5)
    np.testing.assert_allclose(state.mean, [0, 0, -2.0, 0])
    np.testing.assert_array_equal(state.initialized, [False, False, True, False])
    state = update_running_baseline(state, jnp.array([-4.0, -5.0]), jnp.array([ROUTE_PP, ROUTE_PR]), decay=0.5)
    np.testing.assert_allclose(state.mean, [0, 0, -3.0, -5.0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("score_term", ["unbiased", "released_code"])
def test_finite_for_extreme_logps_and_masked_empty_responses(dtype, score_term):
    c = jnp.array([-1e4, -1.0, 0.0, -2.0], dtype)
    r = jnp.array([-1.0, -1e4, 0.0, -1e4], dtype)
    rc = jnp.array([-5.0, -1e4, 0.0, -3.0], dtype)
    rr = jnp.array([-1e4, -2.0, 0.0, -1.0], dtype)
    routes = jnp.array([ROUTE_PP, ROUTE_PR, ROUTE_PP, ROUTE_DP])
    mask = jnp.array([True, True, False, True])  # example 2: zero-length responses, masked

    def mean_loss(c, r):
        loss, metrics = sail_loss(c, r, rc, rr, routes, mask=mask, score_term=score_term, **COEF)
        return loss.sum() / mask.sum(), metrics

    (value, metrics), (gc, gr) = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(c, r)
    assert value.dtype == jnp.float32 and bool(jnp.isfinite(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in (gc, gr))
    assert all(bool(jnp.isfinite(v)) for v in metrics.values())
    assert float(gc[2]) == 0.0 and float(gr[2]) == 0.0
    for loss_type in LOSS_TYPES:
        loss = preference_loss(loss_type, c, r, rc, rr, beta=BETA, chosen_lengths=jnp.array([3, 1, 0, 2]),
                               rejected_lengths=jnp.array([1, 4, 0, 2]))
        assert loss.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(loss))), loss_type


def test_sail_loss_metrics_report_routes_and_terms():
    c, r, rc, rr = _inputs()
    _, m = sail_loss(c, r, rc, rr, ROUTES, **COEF)
    np.testing.assert_allclose(m["route/offline_frac"], 2 / 11)
    np.testing.assert_allclose(m["route/pr_frac"], 3 / 11)
    ell = np.asarray(implicit_log_likelihood(c, r, rc, rr, beta=COEF["beta"]))
    np.testing.assert_allclose(m["sail/dpo_term"], np.mean(-ell[2:]), rtol=1e-5)
    np.testing.assert_allclose(m["sail/self_label_term"], np.mean(0.5 * ell[2:8] ** 2), rtol=1e-5)
    for key in ("rewards/accuracies", "rewards/margins", "sail/score_weight", "sail/baseline", "loss/pp"):
        assert key in m


def test_bad_baseline_and_score_term_names():
    c, r, rc, rr = _inputs()
    with pytest.raises(ValueError, match=r"valid: \['none', 'batch_mean', 'running'\]"):
        sail_loss(c, r, rc, rr, ROUTES, baseline="ema", **COEF)
    with pytest.raises(ValueError, match="needs baseline_state"):
        sail_loss(c, r, rc, rr, ROUTES, baseline="running", **COEF)
    with pytest.raises(ValueError, match=r"valid: \['unbiased', 'released_code'\]"):
        sail_loss(c, r, rc, rr, ROUTES, score_term="paper", **COEF)


# ------------------------------------------------------------- unbiasedness of the surrogate gradient
N_RESPONSES, MC_BETA = 4, 1.0
ORACLE_REWARD = jnp.array([0.0, 1.5, -1.0, 0.5])


def _logp(theta):
    return jax.nn.log_softmax(theta)


def _ell(theta, ref_logp, w, l):
    lp = _logp(theta)
    return jax.nn.log_sigmoid(MC_BETA * ((lp[w] - ref_logp[w]) - (lp[l] - ref_logp[l])))


def _exact_objective(theta, ref_logp, variant):
    """J(θ) by enumerating every pair and label (SAIL.md's bilevel reduction)."""
    pi = jnp.exp(_logp(theta))
    y1, y2 = jnp.meshgrid(jnp.arange(N_RESPONSES), jnp.arange(N_RESPONSES), indexing="ij")
    ell_12, ell_21 = _ell(theta, ref_logp, y1, y2), _ell(theta, ref_logp, y2, y1)
    if variant == "pr":
        p_12 = jax.nn.sigmoid(ORACLE_REWARD[y1] - ORACLE_REWARD[y2])
    else:  # pp: labels from the policy's own implicit reward
        p_12 = jnp.exp(ell_12)
    return jnp.sum(pi[:, None] * pi[None, :] * (p_12 * ell_12 + (1 - p_12) * ell_21))


def _surrogate_grad(theta, ref_logp, key, variant, batch, coef, baseline):
    """One batch's estimate of ∇J: sample pairs from π_θ, label them, differentiate −mean(sail_loss)."""
    k_pair, k_label = jax.random.split(key)
    y = jax.random.categorical(k_pair, theta, shape=(batch, 2))
    y1, y2 = y[:, 0], y[:, 1]
    if variant == "pr":
        p_12 = jax.nn.sigmoid(ORACLE_REWARD[y1] - ORACLE_REWARD[y2])
    else:
        p_12 = jnp.exp(_ell(theta, ref_logp, y1, y2))  # current θ, no gradient through the draw
    first_wins = jax.random.uniform(k_label, (batch,)) < jax.lax.stop_gradient(p_12)
    w, l = jnp.where(first_wins, y1, y2), jnp.where(first_wins, y2, y1)
    route = jnp.full((batch,), ROUTE_PR if variant == "pr" else ROUTE_PP)

    def objective(theta):
        lp = _logp(theta)
        loss, _ = sail_loss(lp[w], lp[l], ref_logp[w], ref_logp[l], route, beta=MC_BETA, rho=0.0,
                            lam=coef, gamma=coef, baseline=baseline)
        return -jnp.mean(loss)

    return jax.grad(objective)(theta)


@pytest.mark.parametrize("variant,baseline", [("pr", "batch_mean"), ("pr", "none"), ("pp", "batch_mean")])
def test_score_function_surrogate_is_unbiased_for_the_exact_gradient(variant, baseline):
    theta = jnp.array([0.3, -0.5, 0.8, 0.0])
    ref_logp = _logp(jnp.array([0.0, 0.2, -0.3, 0.1]))
    exact = jax.grad(_exact_objective)(theta, ref_logp, variant)
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    estimate = jax.jit(jax.vmap(lambda k, c: _surrogate_grad(theta, ref_logp, k, variant, 2000, c, baseline),
                                in_axes=(0, None)))
    full = np.asarray(estimate(keys, 1.0))
    mean, stderr = full.mean(0), full.std(0) / np.sqrt(len(full))
    np.testing.assert_array_less(np.abs(mean - np.asarray(exact)), 4 * stderr + 1e-4)
    # The test has power: plain online DPO (coefficient 0) misses the extra terms by far more.
    dpo_only = np.asarray(estimate(keys, 0.0)).mean(0)
    assert np.max(np.abs(dpo_only - np.asarray(exact)) / (stderr + 1e-6)) > 10
