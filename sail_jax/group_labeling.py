"""The group methods' labelling pass (``pg.method``: GRPO, Dr. GRPO, RLOO): every one of a prompt's k samples
becomes a train row carrying its advantage among its siblings, as one jitted program on the mesh.

Where the log-probs come from (no forward pass is added where the math allows):
- the sampling policy's (``old_token_logps``): the sampler's own per-token log-probs. Unfiltered
  (``top_k = 0``, ``top_p = 1``) its distribution is π at the sampling temperature, exactly what the
  objective scores, so they are π_old without a second forward. They are read where π_old is needed:
  by the clipped ratio when a generation serves several updates (``interval x reuse > 1``; with one
  update per generation π_old = π and the objective uses sg(π), as TRL does), and by RLOO's KL-in-reward.
- the reference's (``ref_token_logps``): one reference forward here, only when β > 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sail_jax.losses import masked_mean
from sail_jax.policy_gradient import (METHODS, group_advantages, group_token_logps, kl_penalised_rewards,
                                      leave_one_out_advantages, make_group_objective)
from sail_jax.sharding import batch_sharding


def needs_old_logps(method: str, beta: float, block_len: int) -> bool:
    """Whether the sampling policy's log-probs enter the loss: the ratio once the policy has moved on
    (a generation serving ``block_len > 1`` updates), or RLOO's KL penalty in the reward."""
    return block_len > 1 or (method == "rloo" and beta > 0)


def label_groups(ref_token_logps, batch, samples, rewards, *, method: str, num_samples: int, beta: float,
                 scale: str, normalize: bool, ratio_needs_old: bool):
    """The train batch of ``b x k`` sampled rows (prompt-major) and its statistics.

    ``batch``: ``prompt_ids``/``prompt_mask`` ``[b, P]``, ``valid`` ``[b]``; ``samples``: ``tokens``,
    ``mask`` and (when needed) the sampler's ``logprobs`` ``[b*k, T]``; ``rewards`` ``[b*k]`` (the reward
    source's, with the missing-EOS penalty). ``ref_token_logps(rows) -> [b*k, T]`` is called when β > 0."""
    if method not in METHODS:
        raise ValueError(f"policy-gradient method {method!r} is unknown; valid: {list(METHODS)}")
    k = num_samples
    rows = {"prompt_ids": jnp.repeat(batch["prompt_ids"], k, axis=0),
            "prompt_mask": jnp.repeat(batch["prompt_mask"], k, axis=0),
            "response": samples["tokens"], "response_mask": samples["mask"],
            "valid": jnp.repeat(batch["valid"], k, axis=0)}
    mask = rows["response_mask"].astype(jnp.float32)
    valid = rows["valid"].astype(jnp.float32)
    ref = ref_token_logps(rows) if beta > 0 else None
    stats = {"pg/reward": masked_mean(rewards, valid),
             "pg/completion_length": masked_mean(mask.sum(-1), valid)}
    if method == "grpo":
        advantages, flat = group_advantages(rewards, k, scale)
        stats["pg/zero_std_frac"] = masked_mean(flat.astype(jnp.float32), valid)
        if ref is not None:
            rows["ref_token_logps"] = ref
    else:
        penalised = rewards if ref is None else kl_penalised_rewards(rewards, samples["logprobs"], ref, mask, beta)
        advantages = leave_one_out_advantages(penalised, k, normalize)
        stats["pg/penalised_reward"] = masked_mean(penalised, valid)
    rows["advantages"] = advantages.astype(jnp.float32)
    stats["pg/advantage_abs"] = masked_mean(jnp.abs(rows["advantages"]), valid)
    if ratio_needs_old:
        rows["old_token_logps"] = samples["logprobs"] * mask
    return rows, stats


def make_group_labeller(ref_graphdef, mesh, *, temperature: float, **static):
    """``label_groups`` jitted on ``mesh``: ``(ref_params, batch, samples, rewards) -> (train batch,
    stats)``, the batch over the batch axes as the train step takes it; the reference scores at the
    sampling ``temperature`` (as the objective scores the policy)."""

    def program(ref_params, batch, samples, rewards):
        reference = nnx.merge(ref_graphdef, ref_params)
        return label_groups(lambda rows: group_token_logps(reference, rows, temperature=temperature), batch, samples,
                            rewards, **static)

    return jax.jit(program, out_shardings=(batch_sharding(mesh), NamedSharding(mesh, P())))


def group_objective(pg, *, max_completion_length: int, temperature: float):
    """``make_group_objective`` with the ``pg`` config section's settings (epsilon_high unset: epsilon)."""
    epsilon, high, delta = float(pg.epsilon), pg.get("epsilon_high", None), pg.get("delta", None)
    return make_group_objective(pg.method, beta=float(pg.beta), epsilon_low=epsilon,
                                epsilon_high=epsilon if high is None else float(high),
                                delta=None if delta is None else float(delta), loss_type=pg.loss_type,
                                importance_level=pg.importance_sampling_level,
                                max_completion_length=max_completion_length, temperature=temperature)


def group_labeller(ref_graphdef, mesh, pg, *, num_samples: int, temperature: float, ratio_needs_old: bool):
    """``make_group_labeller`` with the ``pg`` config section's settings."""
    return make_group_labeller(ref_graphdef, mesh, temperature=temperature, method=pg.method,
                               num_samples=num_samples, beta=float(pg.beta), scale=pg.scale_rewards,
                               normalize=bool(pg.normalize_advantages), ratio_needs_old=ratio_needs_old)
