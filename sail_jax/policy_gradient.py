"""Group-relative policy gradients: GRPO (DeepSeekMath), Dr. GRPO, DAPO's token-level loss and RLOO,
as pure functions of per-token log-probs, rewards and masks (rows prompt-major: a prompt's k samples
are consecutive).

Conventions follow TRL 1.13's ``GRPOTrainer`` / ``RLOOTrainer`` (tested against their loss code), so a
run here and a run there optimise the same objective:
- advantages: GRPO's reward minus its group's mean, divided by the group's (Bessel-corrected) std plus
  1e-4 (``scale="group"``), the whole batch's std (``"batch"``) or not at all (``"none"``, Dr. GRPO);
  RLOO's reward minus the mean of the other k − 1 samples' rewards, after a sequence-level KL penalty
  β·Σ_t (log π_old − log π_ref) in the reward.
- GRPO's per-token loss: −min(w·A, clip(w, 1 − ε_low, 1 + ε_high)·A) with w = π/π_old per token
  (or the length-normalised sequence ratio), plus β times the k3 estimate of KL(π‖π_ref):
  exp(r − l) − (r − l) − 1 with l, r the policy's and the reference's log-probs.
- aggregation (``loss_type``): ``grpo`` each sequence's token mean, then the mean over sequences;
  ``bnpo`` the batch's token mean; ``dr_grpo`` the token sum over (sequences x max completion length);
  ``dapo`` the token sum over the generation batch's token count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sail_jax.losses import masked_mean
from sail_jax.objectives import join_prompt_response, response_token_logps

METHODS = ("grpo", "rloo")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
REWARD_SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: a group whose rewards are all equal gets advantages 0, not 0/0


def _unbiased_std(x, axis=None):
    n = x.size if axis is None else x.shape[axis]
    mean = jnp.mean(x, axis=axis, keepdims=True)
    var = jnp.sum((x - mean) ** 2, axis=axis) / max(n - 1, 1)
    return jnp.sqrt(var) if n > 1 else jnp.zeros_like(var)


def group_advantages(rewards, num_samples: int, scale: str = "group"):
    """GRPO's advantages of ``rewards`` ``[prompts * k]``; returns them and, per row, whether its group's
    rewards were all equal (such a group teaches nothing: its advantages are 0)."""
    if scale not in REWARD_SCALES:
        raise ValueError(f"reward scale {scale!r} is unknown; valid: {list(REWARD_SCALES)}")
    grouped = rewards.reshape(-1, num_samples)
    centred = (grouped - grouped.mean(axis=1, keepdims=True)).reshape(-1)
    group_std = jnp.repeat(_unbiased_std(grouped, axis=1), num_samples)
    std = jnp.full_like(rewards, _unbiased_std(rewards)) if scale == "batch" else group_std
    advantages = centred if scale == "none" else centred / (std + STD_EPS)
    return advantages, jnp.isclose(group_std, 0.0)


def kl_penalised_rewards(rewards, old_token_logps, ref_token_logps, mask, beta: float):
    """RLOO's rewards: minus β times the sampled sequence's log-ratio Σ_t (log π_old − log π_ref)
    (the first-order estimate, which can be negative, as the RLOO paper and TRL use)."""
    if beta == 0.0:
        return rewards
    return rewards - beta * jnp.sum((old_token_logps - ref_token_logps) * mask, axis=-1)


def leave_one_out_advantages(rewards, num_samples: int, normalize: bool = False):
    """RLOO's advantages: each reward minus the mean of its k − 1 siblings' (k ≥ 2); ``normalize``
    standardises them over the batch (TRL's ``normalize_advantages``)."""
    if num_samples < 2:
        raise ValueError(f"a leave-one-out baseline needs at least 2 samples per prompt, got {num_samples}")
    grouped = rewards.reshape(-1, num_samples)
    baseline = (grouped.sum(axis=1, keepdims=True) - grouped) / (num_samples - 1)
    advantages = (grouped - baseline).reshape(-1)
    if normalize:
        advantages = (advantages - advantages.mean()) / (_unbiased_std(advantages) + STD_EPS)
    return advantages


def importance_weights(token_logps, old_token_logps, mask, level: str = "token"):
    """log(π/π_old) per token ``[B, T]``, or per sequence ``[B, 1]`` as the mean over its tokens (GSPO)."""
    log_ratio = token_logps - old_token_logps
    if level == "token":
        return log_ratio
    if level == "sequence":
        return (jnp.sum(log_ratio * mask, -1) / jnp.maximum(mask.sum(-1), 1.0))[:, None]
    raise ValueError(f"importance sampling level {level!r} is unknown; valid: ['token', 'sequence']")


def grpo_token_losses(token_logps, old_token_logps, ref_token_logps, advantages, mask, *, beta: float,
                      epsilon_low: float, epsilon_high: float, delta: float | None = None,
                      importance_level: str = "token"):
    """The clipped surrogate plus β·k3 per token ``[B, T]`` (not yet masked), and its statistics:
    the masked means of the KL estimate and of the low / high clipped fractions."""
    weights = jnp.exp(importance_weights(token_logps, old_token_logps, mask, importance_level))
    clipped = jnp.clip(weights, 1 - epsilon_low, 1 + epsilon_high)
    unclipped = weights if delta is None else jnp.minimum(weights, delta)  # two-sided clipping (INTELLECT-2)
    a = advantages[:, None]
    losses = -jnp.minimum(unclipped * a, clipped * a)
    tokens = jnp.maximum(mask.sum(), 1.0)

    def masked_mean(x):
        return jnp.sum(jnp.broadcast_to(x, mask.shape) * mask) / tokens

    stats = {"clip_ratio/low": masked_mean(((weights < 1 - epsilon_low) & (a < 0)).astype(jnp.float32)),
             "clip_ratio/high": masked_mean(((weights > 1 + epsilon_high) & (a > 0)).astype(jnp.float32))}
    if beta != 0.0:
        diff = ref_token_logps - token_logps
        kl = jnp.exp(diff) - diff - 1.0
        losses = losses + beta * kl
        stats["kl"] = masked_mean(kl)
    return jnp.broadcast_to(losses, mask.shape), stats


def aggregate_token_losses(token_losses, mask, loss_type: str, *, max_completion_length: int,
                           num_items=None, valid=None):
    """One loss from per-token losses ``[B, T]`` (``LOSS_TYPES``). ``num_items``: the generation batch's
    completion tokens for ``dapo`` (its micro-batches share one normaliser; default: this batch's).
    ``valid`` ``[B]``: the rows that are sequences (padding rows count in no mean; default: all)."""
    masked = token_losses * mask
    if loss_type == "grpo":
        return masked_mean(masked.sum(-1) / jnp.maximum(mask.sum(-1), 1.0), valid)
    if loss_type == "bnpo":
        return masked.sum() / jnp.maximum(mask.sum(), 1.0)
    if loss_type == "dr_grpo":
        rows = token_losses.shape[0] if valid is None else jnp.maximum(valid.sum(), 1.0)
        return masked.sum() / (rows * max_completion_length)
    if loss_type == "dapo":
        return masked.sum() / jnp.maximum(mask.sum() if num_items is None else num_items, 1.0)
    raise ValueError(f"loss type {loss_type!r} is unknown; valid: {list(LOSS_TYPES)}")


def rloo_sequence_losses(seq_logps, old_seq_logps, advantages, *, epsilon_low: float, epsilon_high: float):
    """RLOO's clipped surrogate per sequence ``[B]``: the importance ratio of the whole sequence."""
    weights = jnp.exp(seq_logps - old_seq_logps)
    clipped = jnp.clip(weights, 1 - epsilon_low, 1 + epsilon_high)
    return -jnp.minimum(weights * advantages, clipped * advantages)


def group_token_logps(model, batch, *, temperature: float = 1.0):
    """Per-token ``log π(y_t | x, y<t)`` ``[n, T]`` of the batch's sampled responses (0 where masked), at
    the sampling ``temperature`` (as the sampler drew them, and as TRL scores them)."""
    response_mask = batch["response_mask"]
    ids, mask, _ = join_prompt_response(batch["prompt_ids"], batch["prompt_mask"], batch["response"], response_mask)
    return response_token_logps(model(ids, mask), ids, response_mask, temperature=temperature)


def make_group_objective(method: str, *, beta: float, epsilon_low: float, epsilon_high: float,
                         delta: float | None = None, loss_type: str = "dapo", importance_level: str = "token",
                         max_completion_length: int, temperature: float = 1.0):
    """``objective(model, batch, frozen, rng) -> (loss, metrics)`` on a batch of sampled rows with their
    ``advantages`` (computed when labelling). ``old_token_logps`` (the sampling policy's) may be absent:
    one optimizer step per generation samples from the policy being trained, so the ratio is
    π/sg(π) = 1 and only its gradient remains (what TRL does then). GRPO reads ``ref_token_logps``
    when β > 0 (its KL is in the loss); RLOO's KL is already in its advantages. Rows with
    ``valid = 0`` (padding) carry no weight."""
    if method not in METHODS:
        raise ValueError(f"policy-gradient method {method!r} is unknown; valid: {list(METHODS)}")
    if method == "grpo" and loss_type not in LOSS_TYPES:
        raise ValueError(f"loss type {loss_type!r} is unknown; valid: {list(LOSS_TYPES)}")

    def objective(model, batch, frozen, rng):
        del frozen, rng
        tokens = group_token_logps(model, batch, temperature=temperature)
        old = batch.get("old_token_logps")
        old = jax.lax.stop_gradient(tokens) if old is None else old
        valid = batch["valid"].astype(jnp.float32)
        mask = batch["response_mask"].astype(jnp.float32) * valid[:, None]
        advantages = batch["advantages"]
        if method == "rloo":
            losses = rloo_sequence_losses(jnp.sum(tokens * mask, -1), jnp.sum(old * mask, -1), advantages,
                                          epsilon_low=epsilon_low, epsilon_high=epsilon_high)
            return masked_mean(losses, valid), {"pg/advantage_abs": masked_mean(jnp.abs(advantages), valid)}
        losses, stats = grpo_token_losses(tokens, old, batch.get("ref_token_logps"), advantages, mask, beta=beta,
                                          epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
                                          importance_level=importance_level)
        loss = aggregate_token_losses(losses, mask, loss_type, max_completion_length=max_completion_length,
                                      num_items=batch.get("num_items"), valid=valid)
        return loss, {f"pg/{k}": v for k, v in stats.items()}

    return objective
