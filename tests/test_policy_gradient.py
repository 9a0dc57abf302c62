"""GRPO, Dr. GRPO, DAPO and RLOO against TRL 1.13's own code on identical inputs: ``GRPOTrainer._compute_loss``
and ``RLOOTrainer._compute_loss`` (their models replaced by the per-token log-probs they would return)
give each loss type's value and its gradient with respect to every token's log-prob within 1e-5; the
advantages equal TRL's (its ``nanstd``, the lines of ``_generate_and_score_completions`` that use it)
for groups with ties and with zero variance."""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sail_jax.policy_gradient import (aggregate_token_losses, group_advantages, grpo_token_losses,
                                      kl_penalised_rewards, leave_one_out_advantages, rloo_sequence_losses)

B, T, K = 8, 7, 4  # 2 prompts x 4 samples, 7 completion tokens


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    logps = (-rng.gamma(2.0, 0.5, (B, T))).astype(np.float32)
    old = (logps + rng.normal(0, 0.3, (B, T))).astype(np.float32)  # ratios on both sides of the clip range
    ref = (logps + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    advantages = rng.normal(0, 1, B).astype(np.float32)
    return logps, old, ref, advantages, mask


def _fake_trainer(per_token_logps, **attributes):
    """What ``_compute_loss`` reads of a trainer on one process without accumulation; the model's
    per-token log-probs are given."""
    accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        reduce=lambda x, reduction="sum": x)
    return types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=accelerator, _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), **attributes)


def _torch_inputs(old, ref, advantages, mask, **extra):
    return {"prompt_ids": torch.zeros((B, 1), dtype=torch.long), "prompt_mask": torch.ones((B, 1), dtype=torch.long),
            "completion_ids": torch.zeros((B, T), dtype=torch.long), "completion_mask": torch.tensor(mask),
            "advantages": torch.tensor(advantages), "old_per_token_logps": torch.tensor(old),
            "ref_per_token_logps": torch.tensor(ref), **extra}


@pytest.mark.parametrize("loss_type,beta,epsilon_high,delta,level", [
    ("grpo", 0.0, 0.2, None, "token"), ("grpo", 0.04, 0.28, None, "token"), ("grpo", 0.04, 0.2, 1.5, "token"),
    ("grpo", 0.04, 0.2, None, "sequence"), ("bnpo", 0.04, 0.2, None, "token"), ("dr_grpo", 0.0, 0.28, None, "token"),
    ("dr_grpo", 0.04, 0.2, None, "token"), ("dapo", 0.0, 0.28, None, "token"), ("dapo", 0.04, 0.28, 2.0, "token")])
def test_grpo_losses_and_gradients_equal_trls(loss_type, beta, epsilon_high, delta, level):
    from trl import GRPOTrainer

    logps, old, ref, advantages, mask = _inputs()
    epsilon_low = 0.2
    logps_t = torch.tensor(logps, requires_grad=True)
    trainer = _fake_trainer(logps_t, importance_sampling_level=level, beta=beta, loss_type=loss_type,
                            epsilon_low=epsilon_low, epsilon_high=epsilon_high, max_completion_length=T,
                            args=types.SimpleNamespace(use_bias_correction_kl=False, delta=delta,
                                                       steps_per_generation=1))
    theirs = GRPOTrainer._compute_loss(trainer, None, _torch_inputs(
        old, ref, advantages, mask, num_items_in_batch=torch.tensor(mask.sum())))
    theirs.backward()

    def ours(token_logps):
        losses, stats = grpo_token_losses(token_logps, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(advantages),
                                          jnp.asarray(mask), beta=beta, epsilon_low=epsilon_low,
                                          epsilon_high=epsilon_high, delta=delta, importance_level=level)
        return aggregate_token_losses(losses, jnp.asarray(mask), loss_type, max_completion_length=T), stats

    (value, stats), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logps))
    np.testing.assert_allclose(float(value), theirs.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad) * mask, logps_t.grad.numpy() * mask, rtol=1e-5, atol=1e-6)
    logged = trainer._metrics["train"]
    if level == "token":  # TRL logs the clipped fractions over tokens
        np.testing.assert_allclose(float(stats["clip_ratio/low"]), logged["clip_ratio/low_mean"][0], atol=1e-6)
        np.testing.assert_allclose(float(stats["clip_ratio/high"]), logged["clip_ratio/high_mean"][0], atol=1e-6)
        assert 0 < float(stats["clip_ratio/low"]) + float(stats["clip_ratio/high"])  # the clip is exercised
    if beta:
        np.testing.assert_allclose(float(stats["kl"]), logged["kl"][0], rtol=1e-5)


@pytest.mark.parametrize("epsilon_high", [0.2, 0.28])
def test_rloo_loss_and_gradient_equal_trls(epsilon_high):
    from trl import RLOOTrainer

    logps, old, _, advantages, mask = _inputs(1)
    logps_t = torch.tensor(logps, requires_grad=True)
    trainer = _fake_trainer(logps_t, epsilon_low=0.2, epsilon_high=epsilon_high)
    old_seq = (old * mask).sum(1)
    theirs = RLOOTrainer._compute_loss(trainer, None, {**_torch_inputs(old, old, advantages, mask),
                                                       "old_logps": torch.tensor(old_seq)})
    theirs.backward()

    def ours(token_logps):
        seq = jnp.sum(token_logps * mask, -1)
        return jnp.mean(rloo_sequence_losses(seq, jnp.asarray(old_seq), jnp.asarray(advantages), epsilon_low=0.2,
                                             epsilon_high=epsilon_high))

    value, grad = jax.value_and_grad(ours)(jnp.asarray(logps))
    np.testing.assert_allclose(float(value), theirs.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad) * mask, logps_t.grad.numpy() * mask, rtol=1e-5, atol=1e-6)


# Three groups of four: distinct rewards, a tie, and all equal (zero variance: no signal).
REWARDS = np.array([0.3, 1.2, -0.5, 0.9, 1.0, 1.0, 0.0, 2.0, 0.7, 0.7, 0.7, 0.7], np.float32)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trls_with_ties_and_zero_variance(scale):
    """TRL's advantage lines (GRPOTrainer, ``multi_objective_aggregation="sum_then_normalize"``) with
    its own ``nanstd``."""
    from trl.trainer.utils import nanstd

    rewards = torch.tensor(REWARDS)
    mean = rewards.view(-1, K).mean(dim=1).repeat_interleave(K, dim=0)
    std = (nanstd(rewards.view(-1, K), dim=1).repeat_interleave(K, dim=0) if scale != "batch"
           else nanstd(rewards).expand_as(rewards))
    theirs = rewards - mean
    if scale != "none":
        theirs = theirs / (std + 1e-4)
    ours, zero_std = group_advantages(jnp.asarray(REWARDS), K, scale)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5, atol=1e-6)
    assert np.asarray(zero_std).tolist() == [False] * 8 + [True] * 4
    np.testing.assert_array_equal(np.asarray(ours)[8:], 0.0)  # a group that all agrees teaches nothing
    assert float(ours[4]) == float(ours[5])  # tied rewards, tied advantages


@pytest.mark.parametrize("normalize", [False, True])
def test_leave_one_out_advantages_with_the_kl_penalty_equal_trls(normalize):
    """TRL's RLOOTrainer lines: β·Σ(log π_old − log π_ref) out of the reward, then each sample against
    the mean of its siblings (optionally standardised over the batch)."""
    from trl.trainer.utils import nanstd

    rng = np.random.default_rng(2)
    old, ref = rng.normal(-1, 0.5, (12, T)).astype(np.float32), rng.normal(-1, 0.5, (12, T)).astype(np.float32)
    mask = (np.arange(T)[None, :] < rng.integers(1, T + 1, 12)[:, None]).astype(np.float32)
    beta = 0.05
    rewards = torch.tensor(REWARDS) - beta * ((torch.tensor(old) - torch.tensor(ref)) * torch.tensor(mask)).sum(-1)
    grouped = rewards.view(-1, K)
    baselines = ((grouped.sum(dim=1, keepdim=True) - grouped) / (K - 1)).view(-1)
    theirs = rewards - baselines
    if normalize:
        theirs = (theirs - theirs.mean()) / (nanstd(theirs) + 1e-4)
    penalised = kl_penalised_rewards(jnp.asarray(REWARDS), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(mask), beta)
    ours = leave_one_out_advantages(penalised, K, normalize)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5, atol=1e-5)
    assert abs(float(jnp.sum(leave_one_out_advantages(jnp.asarray(REWARDS), K)[8:]))) < 1e-6  # ties: zero


def test_options_outside_the_methods_are_refused():
    with pytest.raises(ValueError, match="valid: \\['group', 'batch', 'none'\\]"):
        group_advantages(jnp.zeros(4), 2, "per_token")
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_advantages(jnp.zeros(4), 1)
    with pytest.raises(ValueError, match="valid: \\['grpo', 'bnpo', 'dr_grpo', 'dapo'\\]"):
        aggregate_token_losses(jnp.zeros((2, 3)), jnp.ones((2, 3)), "ppo", max_completion_length=3)


@pytest.mark.parametrize("method,loss_type", [("grpo", "grpo"), ("grpo", "dapo"), ("grpo", "dr_grpo"),
                                              ("rloo", "")])
def test_on_policy_objective_is_the_advantage_weighted_log_likelihood(method, loss_type):
    """One step per generation (no ``old_token_logps``): every ratio is 1, the loss is −(aggregated
    advantage) and its gradient is that of −Σ A_i·w_i·log π(y_i | x_i) with each method's token
    weights w — computed here row by row through ``response_logps`` (no padding, no batching); the
    padding row (valid = 0) changes nothing."""
    from flax import nnx

    from sail_jax.models import ModelConfig, build_model
    from sail_jax.objectives import response_logps
    from sail_jax.policy_gradient import make_group_objective

    model = build_model(ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                    num_kv_heads=2, head_dim=8), seed=0)
    rng = np.random.default_rng(3)
    n, p, t, temperature = 6, 5, 7, 0.7
    prompt_ids, prompt_mask = rng.integers(1, 61, (n, p)).astype(np.int32), np.ones((n, p), np.int32)
    prompt_mask[1, :2] = 0
    lengths = np.array([7, 3, 1, 5, 6, 2])
    response_mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
    response = rng.integers(1, 61, (n, t)).astype(np.int32) * response_mask
    advantages = rng.normal(0, 1, n).astype(np.float32)
    valid = np.array([1, 1, 1, 1, 1, 0], np.float32)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response": response,
             "response_mask": response_mask, "advantages": advantages, "valid": valid}
    objective = make_group_objective(method, beta=0.0, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type or "dapo",
                                     max_completion_length=t, temperature=temperature)
    graphdef, state = nnx.split(model)

    def loss(state):
        return objective(nnx.merge(graphdef, state), {k: jnp.asarray(v) for k, v in batch.items()}, {}, None)[0]

    weights = {"grpo": 1.0 / lengths / 5, "dapo": np.full(n, 1.0 / lengths[:5].sum()),
               "dr_grpo": np.full(n, 1.0 / (5 * t)), "": np.full(n, 1.0 / 5)}[loss_type]

    def surrogate(state):
        m = nnx.merge(graphdef, state)
        total = 0.0
        for i in range(5):  # the valid rows, each alone at its own length
            logp, _ = response_logps(m, prompt_ids[i:i + 1, prompt_mask[i] == 1], np.ones((1, prompt_mask[i].sum())),
                                     response[i:i + 1, :lengths[i]], np.ones((1, lengths[i])), temperature=temperature)
            total = total - advantages[i] * weights[i] * logp[0]
        return total

    value, grad = jax.value_and_grad(loss)(state)
    expected_value = -float(np.sum(advantages[:5] * weights[:5] * (lengths[:5] if method == "grpo" else 1)))
    np.testing.assert_allclose(float(value), expected_value, rtol=1e-5, atol=1e-6)
    want = jax.grad(surrogate)(state)
    for got, exp in zip(jax.tree.leaves(grad), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=2e-4, atol=1e-6)
