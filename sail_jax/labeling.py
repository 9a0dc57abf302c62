"""Routing, pair selection and preference labels for the online loop: pure functions of arrays and keys,
and ``label_online_batch``, which composes them with the log-prob passes into the one jitted program
that turns a batch of prompts, dataset pairs and samples into the train batch.

Conventions: ``scores [n, k]`` rank the k samples of each prompt (the implicit reward
β·log(π/π_ref) for SAIL-PP, the reward source for SAIL-PR); a label says whether the pair's first
response ``a`` is preferred to ``b``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sail_jax.objectives import join_prompt_response, response_logps, response_token_logps
from sail_jax.sail_terms import ROUTE_DP, ROUTE_OFFLINE, ROUTE_PP, ROUTE_PR
from sail_jax.sharding import batch_sharding

PAIR_SELECTION = ("first_two", "max_min", "random")
# The online loop's random draws, each from ``step_key(seed key, kind, step)``.
ROUTE_KEY, GEN_KEY, SELECT_KEY, LABEL_KEY, DP_KEY = range(5)
LABEL_MODES = ("sample", "argmax")
# Who supplies each sampled pair's other response: the policy (its k samples), the reference model
# (XPO: the policy's sample vs the reference's), the dataset (SPIN: its chosen response always
# beats the policy's one sample) or the geometric mixture of policy and reference (Nash-MD).
OPPONENTS = ("policy", "reference", "data", "mixture")
OPPONENT_SAMPLE = 1  # with opponent=reference or mixture, the opponent's is each prompt's second sample


def draw_routes(key: jax.Array, n: int, *, p_dp: float, p_pp: float, p_pr: float) -> jax.Array:
    """Each example's route, independently: DP/PP/PR with their probabilities, offline otherwise."""
    u = jax.random.uniform(key, (n,))
    edges = jnp.cumsum(jnp.array([p_dp, p_pp, p_pr]))
    return jnp.select([u < edges[0], u < edges[1], u < edges[2]], [ROUTE_DP, ROUTE_PP, ROUTE_PR],
                      ROUTE_OFFLINE).astype(jnp.int32)


def every_row_sampled(sail_cfg) -> bool:
    """Every example takes the sampled route (PP/PR) and its pair comes from the samples alone: no
    DP or offline rows, and not SPIN (whose chosen response is the dataset's). Then the online loop
    needs prompts only (``data.train_kind=prompt``) and labelling skips the dataset pairs."""
    p_dp, p_sampled = float(sail_cfg.p_dp), float(sail_cfg.p_pp) + float(sail_cfg.p_pr)
    return p_dp == 0 and p_sampled >= 1 - 1e-9 and sail_cfg.get("opponent", "policy") != "data"


def select_pairs(key: jax.Array, scores: jax.Array, method: str) -> tuple[jax.Array, jax.Array]:
    """Indices ``(a, b)`` ``[n]`` of two distinct samples to compare among each prompt's k."""
    n, k = scores.shape
    if method == "first_two":
        return jnp.zeros(n, jnp.int32), jnp.ones(n, jnp.int32)
    if method == "max_min":  # two distinct samples even when every score ties (at π = π_ref, β·h is 0 for all)
        a = jnp.argmax(scores, axis=1)
        others = jnp.where(jnp.arange(k)[None, :] == a[:, None], jnp.inf, scores)
        return a.astype(jnp.int32), jnp.argmin(others, axis=1).astype(jnp.int32)
    if method == "random":
        a = jax.random.randint(key, (n,), 0, k)
        b = (a + jax.random.randint(jax.random.fold_in(key, 1), (n,), 1, k)) % k  # distinct from a
        return a.astype(jnp.int32), b.astype(jnp.int32)
    raise ValueError(f"unknown pair_selection {method!r}; valid: {list(PAIR_SELECTION)}")


def preference_labels(key: jax.Array, score_a: jax.Array, score_b: jax.Array, mode: str):
    """``(a_wins, tie)``: ``sample`` draws a ≻ b with probability σ(score_a − score_b) (Bradley–Terry);
    ``argmax`` prefers the higher score and reports exact ties (to be dropped, not guessed)."""
    if mode == "sample":
        p = jax.nn.sigmoid(score_a - score_b)
        return jax.random.uniform(key, score_a.shape) < p, jnp.zeros(score_a.shape, jnp.bool_)
    if mode == "argmax":
        return score_a > score_b, score_a == score_b
    raise ValueError(f"unknown label mode {mode!r}; valid: {list(LABEL_MODES)}")


def dp_swaps(key: jax.Array, h: jax.Array, beta: float) -> jax.Array:
    """SAIL-DP: resample the dataset pair's label from the policy: swap with probability 1 − σ(β·h)."""
    return jax.random.uniform(key, h.shape) >= jax.nn.sigmoid(beta * h)


def same_responses(tokens_a, mask_a, tokens_b, mask_b) -> jax.Array:
    """``[n]``: the two responses are identical (same length, same tokens where they are real)."""
    return jnp.all((tokens_a == tokens_b) | (mask_a == 0), axis=1) & (mask_a.sum(1) == mask_b.sum(1))


def label_online_batch(policy_logp, ref_logp, batch: dict, samples: dict | None, reward, routes, keys: dict, *,
                       beta: float, num_samples: int, pair_selection: str, pp_label_mode: str, pr_label_mode: str,
                       relabel_dp: bool, opponent: str = "policy", ref_token_logp=None, dataset_pairs: bool = True,
                       self_labelled: bool = True):
    """The online train batch from a batch of prompts with dataset pairs, the routes and the samples.

    ``policy_logp(p, pm, r, rm)`` / ``ref_logp(...)`` give log π(r|p) ``[n]`` (the models are closed over);
    ``batch`` may carry the dataset pairs' ``ref_chosen_logps``/``ref_rejected_logps`` (``reference.precompute``);
    ``samples`` holds ``tokens``/``mask`` ``[b*k, T]`` (prompt-major) or is None; ``reward [b, k]`` is
    the PR score of each sample (zeros elsewhere); ``keys`` has ``dp``, ``select`` and ``label``.
    Returns ``(train batch, counts)``: per example the prompt, the labelled pair (dataset, DP-swapped
    or sampled and labelled), their reference log-probs, the route and ``valid`` (ties among sampled
    pairs are dropped), and the counts the loop turns into label metrics. With ``opponent="reference"``
    each prompt's second sample is the reference's (XPO) and ``opponent_chosen`` marks the rows whose
    chosen response it is; with ``opponent="data"`` (SPIN) each prompt has one sample, the rejected
    response against the dataset's chosen one; with ``opponent="mixture"`` (Nash-MD) the chosen response
    is the policy's sample and the rejected one the mixture's, whatever their rewards, with
    ``nash_probability`` = σ(r(y) − r(y')) and the reference's per-token log-probs of the policy's
    sample (``ref_token_logp(...) -> [n, T]``) as ``ref_chosen_token_logps``.

    ``dataset_pairs=False`` (every row sampled: ``data.train_kind=prompt``, or p_pp + p_pr = 1): the
    batch holds prompts only, and the dataset pairs' reference pass is skipped; every row's pair comes
    from the samples, so the train batch equals the one with the pairs.

    ``self_labelled=False`` (p_pp = 0: no row can take the PP route): the samples are scored by the
    reward alone, and the policy's pass over them, which only PP's implicit reward reads, is skipped.
    """
    p, pm = batch["prompt_ids"], batch["prompt_mask"]
    b = p.shape[0]
    if not dataset_pairs:
        empty = jnp.zeros((b, samples["tokens"].shape[1]), jnp.int32)  # replaced row by row below
        batch = {**batch, **{f"{s}_{suffix}": empty for s in ("chosen", "rejected")
                             for suffix in ("response", "response_mask")},
                 "ref_chosen_logps": jnp.zeros(b), "ref_rejected_logps": jnp.zeros(b)}
    out = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "chosen_response", "chosen_response_mask",
                                 "rejected_response", "rejected_response_mask")}
    if "ref_chosen_logps" in batch:  # reference.precompute (or no dataset pairs): read, not recomputed
        ref = {s: batch[f"ref_{s}_logps"] for s in ("chosen", "rejected")}
    else:
        ref = {s: ref_logp(p, pm, batch[f"{s}_response"], batch[f"{s}_response_mask"]) for s in ("chosen", "rejected")}
    out["ref_chosen_logps"], out["ref_rejected_logps"] = ref["chosen"], ref["rejected"]
    valid = batch["valid"].astype(bool)
    is_dp, is_pp, is_pr = routes == ROUTE_DP, routes == ROUTE_PP, routes == ROUTE_PR
    sampled = is_pp | is_pr
    counts = {"dp_rows": is_dp.sum(), "pp_rows": is_pp.sum(), "sampled_rows": sampled.sum()}

    if relabel_dp:  # resample the dataset label from the current policy
        pol = {s: policy_logp(p, pm, batch[f"{s}_response"], batch[f"{s}_response_mask"]) for s in ("chosen", "rejected")}
        h = (pol["chosen"] - ref["chosen"]) - (pol["rejected"] - ref["rejected"])
        swap = dp_swaps(keys["dp"], h, beta) & is_dp
        for suffix in ("response", "response_mask"):
            c, r = out[f"chosen_{suffix}"], out[f"rejected_{suffix}"]
            out[f"chosen_{suffix}"] = jnp.where(swap[:, None], r, c)
            out[f"rejected_{suffix}"] = jnp.where(swap[:, None], c, r)
        c, r = out["ref_chosen_logps"], out["ref_rejected_logps"]
        out["ref_chosen_logps"], out["ref_rejected_logps"] = jnp.where(swap, r, c), jnp.where(swap, c, r)
        counts["dp_swaps"] = swap.sum()

    if samples is not None and opponent == "data":  # SPIN: the dataset's chosen response beats the policy's sample
        tokens, smask = samples["tokens"], samples["mask"]
        out["rejected_response"] = jnp.where(sampled[:, None], tokens, out["rejected_response"])
        out["rejected_response_mask"] = jnp.where(sampled[:, None], smask, out["rejected_response_mask"])
        out["ref_rejected_logps"] = jnp.where(sampled, ref_logp(p, pm, tokens, smask), out["ref_rejected_logps"])
        tie = same_responses(out["chosen_response"], out["chosen_response_mask"], tokens, smask)
        valid &= ~(sampled & tie)
        counts["ties_dropped"] = (sampled & tie).sum()
        counts["pp_flips"] = jnp.zeros((), jnp.int32)
    elif samples is not None:
        k = num_samples
        tokens, smask = samples["tokens"], samples["mask"]
        rp, rpm = jnp.repeat(p, k, axis=0), jnp.repeat(pm, k, axis=0)
        if opponent == "mixture":
            ref_tokens = ref_token_logp(rp, rpm, tokens, smask)
            ref_s = ref_tokens.sum(-1)
        else:
            ref_s = ref_logp(rp, rpm, tokens, smask)
        if self_labelled:
            implicit = beta * (policy_logp(rp, rpm, tokens, smask).reshape(b, k) - ref_s.reshape(b, k))
            scores = jnp.where(is_pp[:, None], implicit, reward)
        else:
            scores = reward
        a, bb = select_pairs(keys["select"], scores, pair_selection)
        rows = jnp.arange(b)
        sa, sb = scores[rows, a], scores[rows, bb]
        pp_wins, pp_tie = preference_labels(keys["label"], sa, sb, pp_label_mode)
        pr_wins, pr_tie = preference_labels(jax.random.fold_in(keys["label"], 1), sa, sb, pr_label_mode)
        a_wins = jnp.where(is_pp, pp_wins, pr_wins)
        ia, ib = rows * k + a, rows * k + bb
        tie = jnp.where(is_pp, pp_tie, pr_tie) | same_responses(tokens[ia], smask[ia], tokens[ib], smask[ib])
        if opponent == "mixture":  # Nash-MD: no label; the policy's sample against the mixture's, ties kept
            a_wins, tie = jnp.ones_like(a_wins), jnp.zeros_like(tie)
            out["nash_probability"] = jnp.where(sampled, jax.nn.sigmoid(sa - sb), 0.5)
            out["ref_chosen_token_logps"] = jnp.where(sampled[:, None], ref_tokens[ia], 0.0)
        win, lose = jnp.where(a_wins, ia, ib), jnp.where(a_wins, ib, ia)
        for name, idx in (("chosen", win), ("rejected", lose)):
            out[f"{name}_response"] = jnp.where(sampled[:, None], tokens[idx], out[f"{name}_response"])
            out[f"{name}_response_mask"] = jnp.where(sampled[:, None], smask[idx], out[f"{name}_response_mask"])
            out[f"ref_{name}_logps"] = jnp.where(sampled, ref_s[idx], out[f"ref_{name}_logps"])
        if opponent == "reference":
            out["opponent_chosen"] = ((win % k == OPPONENT_SAMPLE) & sampled).astype(jnp.int32)
        valid &= ~(sampled & tie)
        counts["ties_dropped"] = (sampled & tie).sum()
        counts["pp_flips"] = ((pp_wins != (sa > sb)) & is_pp).sum()
    if opponent == "reference" and "opponent_chosen" not in out:  # no samples: every row is offline or DP
        out["opponent_chosen"] = jnp.zeros(b, jnp.int32)
    if opponent == "mixture" and "nash_probability" not in out:
        out["nash_probability"] = jnp.full(b, 0.5, jnp.float32)
        out["ref_chosen_token_logps"] = jnp.zeros(out["chosen_response"].shape, jnp.float32)
    out["route"] = routes.astype(jnp.int32)
    out["valid"] = valid.astype(jnp.int32)
    return out, counts


def step_key(base: jax.Array, kind: int, step) -> jax.Array:
    """The key of draw ``kind`` at ``step``: the step counter is the online loop's PRNG state."""
    return jax.random.fold_in(jax.random.fold_in(base, kind), step)


def make_labeller(graphdef, ref_graphdef, mesh, base_key: jax.Array, **static):
    """``label_online_batch`` jitted on ``mesh``: ``(policy_states, ref_params, batch, samples, reward,
    routes, step) -> (train batch, counts)``, the train batch over the batch axes as the train step
    takes it; the draws' keys come from ``base_key`` and the step. ``static`` are
    ``label_online_batch``'s keyword arguments."""
    kinds = {"dp": DP_KEY, "select": SELECT_KEY, "label": LABEL_KEY}

    def program(policy_states, ref_params, batch, samples, reward, routes, step):
        policy, reference = nnx.merge(graphdef, *policy_states), nnx.merge(ref_graphdef, ref_params)
        keys = {name: step_key(base_key, kind, step) for name, kind in kinds.items()}

        def ref_token_logp(p, pm, response, response_mask):
            ids, mask, _ = join_prompt_response(p, pm, response, response_mask)
            return response_token_logps(reference(ids, mask), ids, response_mask)

        return label_online_batch(lambda *rows: response_logps(policy, *rows)[0],
                                  lambda *rows: response_logps(reference, *rows)[0],
                                  batch, samples, reward, routes, keys, ref_token_logp=ref_token_logp, **static)

    return jax.jit(program, out_shardings=(batch_sharding(mesh), NamedSharding(mesh, P())))
