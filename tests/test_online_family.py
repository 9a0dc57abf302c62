"""The online methods around SAIL as routes of one loop: XPO, Nash-MD and online IPO against TRL's own
loss code on identical inputs, and online IPO, XPO, SPIN and Nash-MD running from configs/ on the
built-in task."""

import json
import os
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sail_jax.sail_terms import ROUTE_OFFLINE, ROUTE_PR, sail_terms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _token_logps(rng, n, t):
    """Per-token log-probs ``[n, t]`` with right padding (zeros, as TRL masks them) and their lengths."""
    lengths = rng.integers(1, t + 1, n)
    logps = -rng.gamma(2.0, 1.0, (n, t)).astype(np.float32)
    logps[np.arange(t)[None, :] >= lengths[:, None]] = 0.0
    return logps, lengths


def test_nash_md_loss_and_its_gradient_equal_trls():
    """TRL 1.13's ``NashMDTrainer._compute_losses`` (per-token log-probs of the policy's sample under the
    policy and the reference, and P = σ(r(y) − r(y'))) vs our PR rows with the mixture as the opponent:
    the batch loss and its gradient with respect to every token's log-prob, within 1e-5 (TRL returns
    the batch mean only, so the gradient is what checks each example)."""
    import jax
    from trl.experimental.nash_md import NashMDTrainer

    from sail_jax.objectives import nash_md_weighted_logps

    rng = np.random.default_rng(1)
    n, t, beta = 16, 9, 0.1
    pol, lengths = _token_logps(rng, n, t)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    ref = (pol + rng.normal(0, 0.3, (n, t)) * mask).astype(np.float32)
    probability = rng.random(n).astype(np.float32)

    pol_t = torch.tensor(pol, requires_grad=True)
    loss, _, _ = NashMDTrainer._compute_losses(types.SimpleNamespace(beta=beta), pol_t, torch.tensor(ref),
                                               torch.tensor(probability))
    loss.backward()

    def ours(token_logps):
        seq = token_logps.sum(1)
        terms, _ = sail_terms(seq, jnp.zeros(n), jnp.asarray(ref.sum(1)), jnp.zeros(n), jnp.full(n, ROUTE_PR),
                              beta=beta, rho=0.0, lam=0.0, gamma=0.0, nash_probability=jnp.asarray(probability),
                              nash_weighted_logps=nash_md_weighted_logps(token_logps, jnp.asarray(ref),
                                                                         jnp.asarray(mask)))
        return jnp.mean(sum(terms.values()))

    value, grad = jax.value_and_grad(ours)(jnp.asarray(pol))
    np.testing.assert_allclose(float(value), loss.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad) * mask, pol_t.grad.numpy() * mask, rtol=1e-5, atol=1e-6)


def test_nash_md_term_reads_the_chosen_response_tokens_of_the_one_forward_pass():
    """``sail_batch_logps`` takes Nash-MD's per-token log-probs from the same pass as the sequence
    log-probs: on a model whose logits are a table of the previous token, its ``nash`` equals
    Σ_t (log π(y_t) − log π_ref(y_t))·log π(y_t) over a direct log-softmax of each chosen response, and
    its ``logps`` are those tokens' sums (left-padded prompts, right-padded responses)."""
    import jax

    from sail_jax.objectives import sail_batch_logps

    rng = np.random.default_rng(0)
    b, p, t, v = 3, 4, 5, 11
    table = rng.normal(0, 2, (v, v)).astype(np.float32)
    prompt_ids, prompt_mask = rng.integers(1, v, (b, p)), np.ones((b, p), np.int32)
    prompt_ids[1, :2], prompt_mask[1, :2] = 0, 0
    responses = {k: rng.integers(1, v, (b, t)) for k in ("chosen", "rejected")}
    lengths = {"chosen": np.array([5, 3, 1]), "rejected": np.array([2, 5, 4])}
    masks = {k: (np.arange(t)[None] < n[:, None]).astype(np.int32) for k, n in lengths.items()}
    ref_tokens = (-rng.gamma(2.0, 1.0, (b, t)) * masks["chosen"]).astype(np.float32)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "ref_chosen_token_logps": ref_tokens}
    for k in responses:
        batch[f"{k}_response"], batch[f"{k}_response_mask"] = responses[k] * masks[k], masks[k]
    logps, _, seq_lengths, nash = sail_batch_logps(lambda ids, mask: jnp.asarray(table)[ids],
                                                   {k: jnp.asarray(x) for k, x in batch.items()})

    log_softmax = np.asarray(jax.nn.log_softmax(jnp.asarray(table)))  # row: the previous token
    for j, kind in enumerate(("chosen", "rejected")):
        for i in range(b):
            n, y = lengths[kind][i], responses[kind][i]
            tokens = log_softmax[np.concatenate([prompt_ids[i, -1:], y[:n - 1]]), y[:n]]
            np.testing.assert_allclose(logps[j * b + i], tokens.sum(), rtol=1e-6)
            assert seq_lengths[j * b + i] == n
            if kind == "chosen":
                np.testing.assert_allclose(nash[i], np.sum((tokens - ref_tokens[i, :n]) * tokens), rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_xpo_and_online_ipo_losses_equal_trls(loss_type):
    """TRL 1.13's ``XPOTrainer._compute_losses`` on token log-probs of the policy's and the reference's
    samples vs our SAIL terms on a PR batch whose pairs are (policy sample, reference sample) labelled
    by ``chosen_mask``: DPO/IPO losses and XPO's α·logπ(y_ref), per example, within 1e-5."""
    from trl.experimental.xpo import XPOTrainer

    rng = np.random.default_rng(0)
    n, t, beta, alpha = 16, 9, 0.1, 0.05
    (pol_on_pol, _), (pol_on_ref, _) = _token_logps(rng, n, t), _token_logps(rng, n, t)
    ref_on_ref = pol_on_ref + rng.normal(0, 0.3, (n, t)).astype(np.float32) * (pol_on_ref != 0)
    ref_on_pol = pol_on_pol + rng.normal(0, 0.3, (n, t)).astype(np.float32) * (pol_on_pol != 0)
    policy_wins = rng.random(n) < 0.5
    trl_self = types.SimpleNamespace(args=types.SimpleNamespace(loss_type=loss_type), beta=beta, alpha=alpha)
    _, dpo_losses, xpo_losses = XPOTrainer._compute_losses(
        trl_self, *(torch.tensor(x) for x in (pol_on_pol, pol_on_ref, ref_on_ref, ref_on_pol)),
        torch.tensor(policy_wins))
    theirs = (dpo_losses + xpo_losses).numpy()

    s = {k: v.sum(1) for k, v in dict(pp=pol_on_pol, pr=pol_on_ref, rr=ref_on_ref, rp=ref_on_pol).items()}
    w = policy_wins
    terms, _ = sail_terms(
        jnp.where(w, s["pp"], s["pr"]), jnp.where(w, s["pr"], s["pp"]), jnp.where(w, s["rp"], s["rr"]),
        jnp.where(w, s["rr"], s["rp"]), jnp.full(n, ROUTE_PR), beta=beta, rho=0.0, lam=0.0, gamma=0.0,
        online_loss_type="" if loss_type == "sigmoid" else loss_type, xpo_alpha=alpha,
        opponent_chosen=jnp.asarray(~w), loss_type="sigmoid")
    ours = np.asarray(sum(terms.values()))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(terms["xpo"]), xpo_losses.numpy(), rtol=1e-6)


def test_xpo_term_is_only_on_sampled_rows_and_needs_the_opponent():
    c, r = jnp.array([-3.0, -4.0]), jnp.array([-5.0, -2.0])
    terms, m = sail_terms(c, r, c, r, jnp.array([ROUTE_OFFLINE, ROUTE_PR]), beta=0.1, rho=0.0, lam=0.0, gamma=0.0,
                          xpo_alpha=0.5, opponent_chosen=jnp.array([1, 0]))
    np.testing.assert_allclose(terms["xpo"], [0.0, 0.5 * -2.0])
    assert float(m["xpo/opponent_logps"]) == -2.0
    with pytest.raises(ValueError, match="needs opponent_chosen"):
        sail_terms(c, r, c, r, jnp.array([ROUTE_PR, ROUTE_PR]), beta=0.1, rho=0.0, lam=0.0, gamma=0.0, xpo_alpha=0.5)


@pytest.mark.slow
def test_online_ipo_xpo_spin_and_nash_md_run_from_configs_and_learn(tmp_path):
    """configs/online_ipo.py, xpo.py, spin.py and nash_md.py on the built-in task (a small one, built
    once and shared): each runs end to end and its training loss falls — for SPIN within an iteration,
    since each iteration's reference is the policy it starts from (its loss restarts at log 2). Nash-MD's
    loss is a score-function surrogate whose value need not fall: there the policy's sample must come
    to beat the mixture's (P > ½) and the oracle reward must rise. Each evaluation logs its completions
    to completions.jsonl and TensorBoard. Online IPO trains on the task's prompts alone
    (data.train_kind=prompt: all 256 of its training prompts, not only those with a pair)."""
    env = {**os.environ, "XLA_FLAGS": ""}
    small = ["--config.steps=30", "--config.eval_every=30", "--config.log_every=1", "--config.checkpoint.every=30",
             "--config.task.sft_steps=100", "--config.task.preference_train=256", "--config.task.preference_eval=32",
             f"--config.task.dir={tmp_path / 'task'}"]
    for name in ("online_ipo", "xpo", "spin", "nash_md"):
        workdir = tmp_path / name
        prompts_only = ["--config.data.train_kind=prompt"] if name == "online_ipo" else []
        out = subprocess.run([sys.executable, "-m", "sail_jax.cli", f"--config=configs/{name}.py",
                              f"--workdir={workdir}", *small, *prompts_only], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        if prompts_only:
            prompts = [json.loads(line) for line in open(tmp_path / "task" / "prompts_train.jsonl")]
            assert len(prompts) == 256 and set(prompts[0]) == {"prompt"}
        train = [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if r["split"] == "train"]
        losses = [r["loss"] for r in train]
        assert len(losses) == 30, (name, len(losses))
        summary = json.loads((workdir / "summary.json").read_text())
        assert summary["variant"] == name
        if name == "nash_md":
            assert np.mean([r["nash/probability"] for r in train[-10:]]) > 0.5, train[-10:]
            assert summary["final"]["reward"] > summary["reference"]["reward"] + 0.1, summary
        else:
            first, last = (losses[:1], losses[7:10]) if name == "spin" else (losses[:3], losses[-5:])
            assert np.mean(last) < np.mean(first), (name, losses)
        completions = [json.loads(line) for line in open(workdir / "completions.jsonl")]
        assert len(completions) == 8 and {r["step"] for r in completions} == {30}
        assert set(completions[0]) == {"step", "prompt", "reference", "reference_reward", "policy", "policy_reward"}
        events = b"".join(f.read_bytes() for f in (workdir / "tensorboard").iterdir())
        assert b"eval/completions" in events
