"""SAIL's terms against analytic gradients and an exact J(θ) (enumerated tiny categorical policy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sail_jax.losses import LOSS_TYPES, preference_loss
from sail_jax.sail_terms import (ROUTE_DP, ROUTE_OFFLINE, ROUTE_PP, ROUTE_PR, RunningBaseline, implicit_log_likelihood,
                                 sail_loss, sail_terms, update_running_baseline)

BETA = 0.1

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
    from sail_jax.sail_terms import _baseline

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


@pytest.mark.parametrize("online_loss_type", ["ipo", "hinge"])
def test_online_loss_type_replaces_only_the_online_rows_preference_term(online_loss_type):
    """Online IPO (and any loss type) on the DP/PP/PR rows: their preference term is that loss, the
    offline rows keep ``loss_type``, and ½ℓ², S and RevKL do not change."""
    from sail_jax.sail_terms import sail_terms

    c, r, rc, rr = _inputs()
    base, _ = sail_terms(c, r, rc, rr, ROUTES, **COEF, revkl=0.1, loss_type="sigmoid")
    got, m = sail_terms(c, r, rc, rr, ROUTES, **COEF, revkl=0.1, loss_type="sigmoid", online_loss_type=online_loss_type)
    online = np.asarray(preference_loss(online_loss_type, c, r, rc, rr, beta=COEF["beta"]))
    offline = np.asarray(ROUTES) == ROUTE_OFFLINE
    np.testing.assert_allclose(got["preference"], np.where(offline, base["preference"], online), rtol=1e-6)
    for term in ("self_label", "score", "revkl"):
        np.testing.assert_array_equal(got[term], base[term])
    np.testing.assert_allclose(m["sail/dpo_term"], online[~offline].mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'"):
        sail_terms(c, r, rc, rr, ROUTES, **COEF, online_loss_type="dpo")


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


def _exact_objective(theta, ref_logp, variant, alpha=0.0):
    """J(θ) − α·KL(π_θ‖π_ref) by enumerating every pair and label (SAIL.md's bilevel reduction; α > 0 is
    SAIL-RevKL)."""
    pi = jnp.exp(_logp(theta))
    kl = jnp.sum(pi * (_logp(theta) - ref_logp))
    y1, y2 = jnp.meshgrid(jnp.arange(N_RESPONSES), jnp.arange(N_RESPONSES), indexing="ij")
    ell_12, ell_21 = _ell(theta, ref_logp, y1, y2), _ell(theta, ref_logp, y2, y1)
    if variant == "pr":
        p_12 = jax.nn.sigmoid(ORACLE_REWARD[y1] - ORACLE_REWARD[y2])
    else:  # pp: labels from the policy's own implicit reward
        p_12 = jnp.exp(ell_12)
    return jnp.sum(pi[:, None] * pi[None, :] * (p_12 * ell_12 + (1 - p_12) * ell_21)) - alpha * kl


def _surrogate_grad(theta, ref_logp, key, variant, batch, coef, baseline, alpha=0.0):
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
                            lam=coef, gamma=coef, baseline=baseline, revkl=alpha)
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


@pytest.mark.parametrize("variant", ["pp", "pr"])
def test_revkl_surrogate_is_unbiased_for_the_exact_penalised_gradient(variant):
    """SAIL-RevKL: the surrogate gradient, averaged over sampled pairs, is ∇(J − α·KL(π‖π_ref)) exactly."""
    theta = jnp.array([0.3, -0.5, 0.8, 0.0])
    ref_logp = _logp(jnp.array([0.0, 0.2, -0.3, 0.1]))
    alpha = 2.0
    exact = np.asarray(jax.grad(_exact_objective)(theta, ref_logp, variant, alpha))
    keys = jax.random.split(jax.random.PRNGKey(1), 200)
    estimate = jax.jit(jax.vmap(lambda k, a: _surrogate_grad(theta, ref_logp, k, variant, 2000, 1.0, "batch_mean", a),
                                in_axes=(0, None)))
    full = np.asarray(estimate(keys, alpha))
    mean, stderr = full.mean(0), full.std(0) / np.sqrt(len(full))
    np.testing.assert_array_less(np.abs(mean - exact), 4 * stderr + 1e-4)
    # Power: without the penalty the estimate misses ∇(J − α·KL) by many standard errors.
    unpenalised = np.asarray(estimate(keys, 0.0)).mean(0)
    assert np.max(np.abs(unpenalised - exact) / (stderr + 1e-6)) > 10


def test_revkl_pair_estimator_is_exactly_unbiased_and_ignores_identical_pairs():
    """Per pair, ĝ = ½(d₁ − d₂)(∇logπ(y₁) − ∇logπ(y₂)), d = logπ − logπ_ref: enumerated over all pairs its
    mean is ∇KL(π‖π_ref) exactly; an identical pair (d₁ = d₂) contributes nothing, so dropping identical
    pairs biases nothing; and it is invariant to a per-prompt offset of d, unlike ½Σⱼ dⱼ∇logπ(yⱼ)."""
    theta = jnp.array([1.5, -0.5, 0.8, -1.0])
    ref_logp = _logp(jnp.array([0.0, 0.2, -0.3, 0.1]))
    pi = jnp.exp(_logp(theta))
    exact = jax.grad(lambda t: jnp.sum(jnp.exp(_logp(t)) * (_logp(t) - ref_logp)))(theta)
    route = jnp.full((1,), ROUTE_PP)

    def pair_grad(y1, y2, offset=0.0):
        def revkl(t):
            lp = _logp(t)
            terms, _ = sail_terms(lp[y1][None], lp[y2][None], ref_logp[y1][None] - offset,
                                  ref_logp[y2][None] - offset, route, beta=MC_BETA, rho=0.0, lam=0.0, gamma=0.0,
                                  revkl=1.0)
            return terms["revkl"].sum()

        return np.asarray(jax.grad(revkl)(theta))

    pairs = [(i, j) for i in range(N_RESPONSES) for j in range(N_RESPONSES)]
    w = np.array([float(pi[i] * pi[j]) for i, j in pairs])
    np.testing.assert_allclose(w @ np.stack([pair_grad(i, j) for i, j in pairs]), exact, atol=1e-5)
    np.testing.assert_allclose(pair_grad(2, 2), 0.0, atol=1e-7)
    np.testing.assert_allclose(pair_grad(0, 3, offset=30.0), pair_grad(0, 3), atol=1e-5)
