"""The released-code mode against a transcription of the authors' own gradient (PyTorch, tensor hooks).

Transcribed from github.com/xudongwu-0/SAIL, commit 75786c1, ``cdpo/cdpo_trainer.py``,
``GeneralizedDPOTrainer.dpo_loss`` (lines 1056–1201), ``loss_type="generalized_sigmoid"``: the loss
``−ℓ − ½ρ(ℓ·[DP])² − ½π(ℓ·[PP])²`` (DP's label switch applied to the logits inside the loss), and hooks
on the per-sequence policy log-probs that replace each incoming gradient g by
``g − π·ℓ/logπ(y)·[PP] − γ·ℓ/logπ(y)·[PR]`` (ℓ detached). The HF Trainer differentiates
``losses.mean()`` over the per-device micro-batch, divided by the gradient-accumulation steps.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sail_jax.objectives import make_sail_objective
from sail_jax.sail_terms import ROUTE_DP, ROUTE_OFFLINE, ROUTE_PP, ROUTE_PR, RunningBaseline, sail_loss

torch = pytest.importorskip("torch")
F = torch.nn.functional

BETA, RHO, PI, GAMMA = 0.1, 0.2, 0.3, 0.4
ROUTES = np.array([ROUTE_OFFLINE, ROUTE_DP, ROUTE_DP, ROUTE_PP, ROUTE_PP, ROUTE_PP, ROUTE_PR, ROUTE_PR])


def _inputs(seed=0):
    rng = np.random.RandomState(seed)
    c, r, rc, rr = (-rng.uniform(3, 30, len(ROUTES)) for _ in range(4))
    switch = rng.rand(len(ROUTES)) < 0.5  # their Bernoulli draw for DP, fixed here
    return c, r, rc, rr, switch


def _their_gradient(c, r, rc, rr, switch, routes=ROUTES, accumulation_steps=1):
    """Their micro-batch's ∂/∂(policy_chosen_logps, policy_rejected_logps), verbatim in PyTorch."""
    policy_chosen_logps = torch.tensor(c, dtype=torch.float64, requires_grad=True)
    policy_rejected_logps = torch.tensor(r, dtype=torch.float64, requires_grad=True)
    ddp = torch.tensor(routes == ROUTE_DP, dtype=torch.float64)
    dpp = torch.tensor(routes == ROUTE_PP, dtype=torch.float64)
    dpr = torch.tensor(routes == ROUTE_PR, dtype=torch.float64)
    logits = (policy_chosen_logps - policy_rejected_logps) - torch.tensor(rc - rr, dtype=torch.float64)
    logits = (1 - 2 * ddp * torch.tensor(switch, dtype=torch.float64)) * logits
    losses = -F.logsigmoid(BETA * logits)
    losses = losses - 0.5 * RHO * (F.logsigmoid(BETA * logits) * ddp) ** 2
    losses = losses - 0.5 * PI * (F.logsigmoid(BETA * logits) * dpp) ** 2
    detached_loss = F.logsigmoid(BETA * logits).detach()
    dc, dr = policy_chosen_logps.detach(), policy_rejected_logps.detach()
    policy_chosen_logps.register_hook(
        lambda g: g - PI * detached_loss / dc * dpp - GAMMA * detached_loss / dc * dpr)
    policy_rejected_logps.register_hook(
        lambda g: g - PI * detached_loss / dr * dpp - GAMMA * detached_loss / dr * dpr)
    (losses.mean() / accumulation_steps).backward()
    return policy_chosen_logps.grad.numpy(), policy_rejected_logps.grad.numpy()


def _ours(c, r, rc, rr, switch):
    """Our pair after labelling: DP's switch is a swap of chosen and rejected (done by the loop)."""
    dp_swap = switch & (ROUTES == ROUTE_DP)
    c2, r2 = np.where(dp_swap, r, c), np.where(dp_swap, c, r)
    rc2, rr2 = np.where(dp_swap, rr, rc), np.where(dp_swap, rc, rr)
    return c2, r2, rc2, rr2, dp_swap


def _sail_cfg(**extra):
    return ml_collections.ConfigDict({"rho": RHO, "lam": PI, "gamma": GAMMA, "revkl": 0.0, "baseline": "none",
                                      "score_term": "released_code", **extra})


def _objective_grads(c, r, rc, rr, *, data_parallel=1, grad_accum_steps=1, valid=None, **extra):
    """∂(our batch loss)/∂(chosen, rejected log-probs) through ``make_sail_objective``'s scaling."""
    loss_cfg = ml_collections.ConfigDict({"beta": BETA, "loss_type": "sigmoid", "label_smoothing": 0.0})
    objective = make_sail_objective(loss_cfg, _sail_cfg(**extra), data_parallel=data_parallel,
                                    grad_accum_steps=grad_accum_steps)
    n = len(ROUTES)
    batch = {"route": jnp.asarray(ROUTES), "valid": jnp.ones(n, jnp.int32) if valid is None else jnp.asarray(valid),
             "ref_chosen_logps": jnp.asarray(rc, jnp.float32), "ref_rejected_logps": jnp.asarray(rr, jnp.float32)}

    def loss(c, r):
        logps = jnp.concatenate([c, r])
        per_term, _, n_valid = objective.terms(logps, logps, jnp.ones(2 * n), batch, {"baseline": RunningBaseline.init()})
        return jnp.sum(sum(per_term.values())) / n_valid

    return [np.asarray(g) for g in jax.grad(loss, argnums=(0, 1))(jnp.asarray(c, jnp.float32),
                                                                   jnp.asarray(r, jnp.float32))]


def _unswap(gc, gr, dp_swap):
    return np.where(dp_swap, gr, gc), np.where(dp_swap, gc, gr)


@pytest.mark.parametrize("seed", [0, 1])
def test_released_code_mode_equals_the_authors_batch_gradient_per_micro_batch(seed):
    c, r, rc, rr, switch = _inputs(seed)
    theirs = _their_gradient(c, r, rc, rr, switch)
    c2, r2, rc2, rr2, dp_swap = _ours(c, r, rc, rr, switch)
    gc, gr = _unswap(*_objective_grads(c2, r2, rc2, rr2), dp_swap)
    np.testing.assert_allclose(gc, theirs[0], atol=1e-5)
    np.testing.assert_allclose(gr, theirs[1], atol=1e-5)
    # The per-example formulation (scale 1) differs: the hook is B = 8 times weaker there.
    gc1, _ = _unswap(*_objective_grads(c2, r2, rc2, rr2, released_code_scale=1.0), dp_swap)
    assert np.max(np.abs(gc1 - theirs[0])) > 1e-2


def test_released_code_scale_follows_devices_and_accumulation():
    """Two data-parallel devices of 4 rows each (DDP averages their gradients, each hook unscaled by its 4
    rows) and G accumulation micro-steps (their loss is divided by G, their hook is not, and the G
    gradients add up; optax.MultiSteps averages ours): over G identical micro-steps, the same update."""
    c, r, rc, rr, switch = _inputs(2)
    c2, r2, rc2, rr2, dp_swap = _ours(c, r, rc, rr, switch)
    for accumulation in (1, 2):
        theirs = [np.zeros(8), np.zeros(8)]
        for rows in (slice(0, 4), slice(4, 8)):
            g = _their_gradient(c[rows], r[rows], rc[rows], rr[rows], switch[rows], routes=ROUTES[rows],
                                accumulation_steps=accumulation)
            theirs[0][rows], theirs[1][rows] = accumulation * g[0] / 2, accumulation * g[1] / 2
        ours = _unswap(*_objective_grads(c2, r2, rc2, rr2, data_parallel=2, grad_accum_steps=accumulation), dp_swap)
        for got, want in zip(ours, theirs):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_released_code_hook_raises_both_sampled_log_probs():
    """ℓ ≤ 0 and logπ < 0, so the added gradient −coef·ℓ/logπ is negative: a descent step raises logπ of
    both sampled responses (S, with ℓ below its baseline, would lower them)."""
    c, r = jnp.array([-5.0, -8.0]), jnp.array([-6.0, -4.0])
    rc, rr = jnp.array([-5.5, -7.0]), jnp.array([-6.5, -4.5])
    route = jnp.array([ROUTE_PR, ROUTE_PR])
    base = dict(beta=BETA, rho=0.0, lam=0.0, gamma=0.0)

    def grads(**kw):
        return jax.grad(lambda c, r: sail_loss(c, r, rc, rr, route, **{**base, **kw})[0].sum(), argnums=(0, 1))(c, r)

    plain = grads()
    hooked = grads(gamma=GAMMA, score_term="released_code")
    assert bool(jnp.all(hooked[0] - plain[0] < 0)) and bool(jnp.all(hooked[1] - plain[1] < 0))
