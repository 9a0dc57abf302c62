"""Training objectives: ``(model, batch, frozen, rng) -> (loss, metrics)`` for SFT, reward models, offline
preference optimisation and SAIL's online batch.

Batches are the arrays of ``sail_jax.data.pipeline``; every row carries ``valid`` (0 for eval
padding), and every mean below is over valid rows only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sail_jax.data.packing import is_packed, packed_logits, packed_sequence_sums
from sail_jax.logprobs import masked_token_logprobs, sequence_logprobs, token_logprobs
from sail_jax.losses import check_loss_type, masked_mean, preference_loss, preference_metrics
from sail_jax.sail_terms import TERMS, sail_terms
from sail_jax.train import policy

REFERENCE_MODES = ("model", "cached", "none")  # live reference forward, precomputed log-probs, reference-free


def _pair_batch(batch):
    """Chosen and rejected rows stacked into one ``[2b, t]`` batch: one forward pass for both."""
    cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)  # noqa: E731
    return cat("input_ids"), cat("attention_mask"), cat("loss_mask")


def pair_logps(model, batch):
    """``(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)``, each ``[b]``; from the
    right-padded rows, or from packed ones (``sail_jax.data.packing``)."""
    b = batch["valid"].shape[0]
    if is_packed(batch):
        ids, loss_mask = batch["packed_input_ids"], batch["packed_loss_mask"]
        tokens = masked_token_logprobs(packed_logits(model, batch), ids, loss_mask)
        logps = packed_sequence_sums(tokens, batch, 2 * b)
        lengths = packed_sequence_sums(loss_mask[:, 1:].astype(jnp.float32), batch, 2 * b)
    else:
        ids, mask, loss_mask = _pair_batch(batch)
        logps, lengths = sequence_logprobs(model(ids, mask), ids, loss_mask)
    return logps[:b], logps[b:], lengths[:b], lengths[b:]


def sft_objective(model, batch, frozen, rng):
    """Mean negative log-likelihood per response token (right-padded or packed rows)."""
    del frozen, rng
    if is_packed(batch):  # every packed token belongs to a real row: no valid mask to apply
        ids, logits, mask = batch["packed_input_ids"], packed_logits(model, batch), batch["packed_loss_mask"]
    else:
        ids = batch["input_ids"]
        logits, mask = model(ids, batch["attention_mask"]), batch["loss_mask"] * batch["valid"][:, None]
    logp = token_logprobs(logits[:, :-1], ids[:, 1:])
    mask = mask[:, 1:].astype(jnp.float32)
    tokens = jnp.sum(mask)
    nll = -jnp.sum(logp * mask) / jnp.maximum(tokens, 1.0)
    return nll, {"nll": nll, "perplexity": jnp.exp(nll), "tokens": tokens}


def reward_objective(model, batch, frozen, rng):
    """Bradley–Terry: ``−log σ(r(chosen) − r(rejected))`` with the reward-model head."""
    del frozen, rng
    ids, mask, _ = _pair_batch(batch)
    scores = model(ids, mask)
    b = batch["chosen_input_ids"].shape[0]
    chosen, rejected = scores[:b], scores[b:]
    valid = batch["valid"]
    loss = masked_mean(-jax.nn.log_sigmoid(chosen - rejected), valid)
    return loss, {
        "rewards/chosen": masked_mean(chosen, valid),
        "rewards/rejected": masked_mean(rejected, valid),
        "rewards/margins": masked_mean(chosen - rejected, valid),
        "rewards/accuracies": masked_mean((chosen > rejected).astype(jnp.float32), valid),
    }


def reference_logps(graphdef, reference_params, batch):
    """The frozen reference's ``(chosen_logps, rejected_logps)`` (no gradient flows into them)."""
    c, r, _, _ = pair_logps(nnx.merge(graphdef, reference_params), batch)
    return jax.lax.stop_gradient(c), jax.lax.stop_gradient(r)


def make_dpo_objective(loss_cfg, graphdef, reference_mode: str):
    """Offline preference optimisation with ``loss_cfg.loss_type`` (any of ``losses.LOSS_TYPES``).

    ``reference_mode``: ``model`` reads the reference parameters from ``frozen["reference"]``,
    ``cached`` reads ``ref_chosen_logps``/``ref_rejected_logps`` from the batch, ``none`` is
    reference-free.
    """
    check_loss_type(loss_cfg.loss_type)
    if reference_mode not in REFERENCE_MODES:
        raise ValueError(f"unknown reference mode {reference_mode!r}; valid: {list(REFERENCE_MODES)}")
    beta, smoothing = float(loss_cfg.beta), float(loss_cfg.get("label_smoothing", 0.0))

    def objective(model, batch, frozen, rng):
        del rng
        c, r, c_len, r_len = pair_logps(model, batch)
        if reference_mode == "model":
            rc, rr = reference_logps(graphdef, frozen["reference"], batch)
        elif reference_mode == "cached":
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            rc = rr = None
        valid = batch["valid"]
        per_example = preference_loss(loss_cfg.loss_type, c, r, rc, rr, beta=beta, label_smoothing=smoothing,
                                      chosen_lengths=c_len, rejected_lengths=r_len)
        metrics = preference_metrics(c, r, rc, rr, beta=beta, mask=valid)
        return masked_mean(per_example, valid), metrics

    return objective


def join_prompt_response(prompt_ids, prompt_mask, response, response_mask):
    """``[n, P + T]`` rows of a left-padded prompt followed by a right-padded response, with the
    loss mask on the response (positions come from the mask, so the gap of padding is harmless)."""
    ids = jnp.concatenate([prompt_ids, response], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    loss_mask = jnp.concatenate([jnp.zeros_like(prompt_mask), response_mask], axis=1)
    return ids, mask, loss_mask


def response_logps(model, prompt_ids, prompt_mask, response, response_mask, *, temperature: float = 1.0):
    """``log π(response | prompt)`` ``[n]`` (at ``temperature``) and the response lengths."""
    ids, mask, loss_mask = join_prompt_response(prompt_ids, prompt_mask, response, response_mask)
    return sequence_logprobs(model(ids, mask), ids, loss_mask, temperature=temperature)


def response_token_logps(logits, ids, response_mask, *, temperature: float = 1.0):
    """Per-token ``log π(y_t | x, y<t)`` ``[n, T]`` (at ``temperature``) of the ``T`` response tokens
    closing ``ids`` (0 where masked), from the logits of a forward pass over ``ids``."""
    t = response_mask.shape[1]
    tokens = token_logprobs(logits[:, -t - 1:-1], ids[:, -t:], temperature=temperature)
    return tokens * response_mask.astype(jnp.float32)


def nash_md_weighted_logps(token_logps, ref_token_logps, response_mask):
    """``Σ_t sg(log π(y_t) − log π_ref(y_t))·log π(y_t)`` ``[n]``: TRL's Nash-MD KL term, whose gradient
    weights each token's ∇log π by that token's own log-ratio."""
    mask = response_mask.astype(jnp.float32)
    ratio = jax.lax.stop_gradient(token_logps - ref_token_logps)
    return jnp.sum(ratio * token_logps * mask, axis=-1)


def sail_batch_logps(model, batch, *, score_temperature: float = 1.0):
    """One forward pass over the online batch's chosen and rejected rows: ``(logps, score_logps,
    lengths, nash)``, the first three ``[2b]`` (chosen rows first), ``score_logps`` at
    ``score_temperature``; ``nash [b]`` is ``nash_md_weighted_logps`` of the chosen rows when the batch
    carries their per-token reference log-probs (Nash-MD), else zeros."""
    prompt_ids = jnp.concatenate([batch["prompt_ids"]] * 2, axis=0)
    prompt_mask = jnp.concatenate([batch["prompt_mask"]] * 2, axis=0)
    response = jnp.concatenate([batch["chosen_response"], batch["rejected_response"]], axis=0)
    response_mask = jnp.concatenate([batch["chosen_response_mask"], batch["rejected_response_mask"]], axis=0)
    ids, mask, loss_mask = join_prompt_response(prompt_ids, prompt_mask, response, response_mask)
    logits = model(ids, mask)
    tokens = masked_token_logprobs(logits, ids, loss_mask)
    logps, lengths = jnp.sum(tokens, axis=-1), jnp.sum(loss_mask[:, 1:].astype(jnp.float32), axis=-1)
    t = float(score_temperature)
    score = sequence_logprobs(logits, ids, loss_mask, temperature=t)[0] if t != 1.0 else logps
    b = batch["prompt_ids"].shape[0]
    if "ref_chosen_token_logps" in batch:  # the chosen rows' response tokens, already computed above
        chosen_mask = batch["chosen_response_mask"]
        response_tokens = tokens[:b, -chosen_mask.shape[1]:]
        nash = nash_md_weighted_logps(response_tokens, batch["ref_chosen_token_logps"], chosen_mask)
    else:
        nash = jnp.zeros((b,), jnp.float32)
    return logps, score, lengths, nash


def make_sail_objective(loss_cfg, sail_cfg, *, score_temperature: float = 1.0, data_parallel: int = 1,
                        grad_accum_steps: int = 1):
    """SAIL's per-route loss (``sail_terms``) on the online batch.

    The batch holds, per example: the prompt, the labelled pair's responses (dataset or sampled),
    their reference log-probs (computed when labelling), ``route`` and ``valid`` (false for dropped
    ties). ``frozen["baseline"]`` is the running score-function baseline.

    The released-code mode's hook is scaled to the authors' batch gradient: their trainer adds it to
    the gradient of the *mean* over each device's micro-batch (not divided by its B rows) and of the
    loss divided by the accumulation steps (not divided either), and DDP averages devices. Our loss
    is the mean over the global batch (B x ``data_parallel`` rows; optax.MultiSteps averages the
    ``grad_accum_steps`` micro-steps), so the hook is multiplied by B x accumulation steps, B = valid
    rows / ``data_parallel``; ``sail.released_code_scale`` fixes another factor (1: per example).

    Returns ``objective(model, batch, frozen, rng) -> (loss, metrics)``; ``objective.terms(logps,
    score_logps, lengths, batch, frozen) -> (terms, metrics, n_valid)`` is the loss as a function of
    the batch's log-probs (for per-term diagnostics).
    """
    beta, t = float(loss_cfg.beta), float(score_temperature)
    fixed_scale = sail_cfg.get("released_code_scale", None)
    lam_score = sail_cfg.get("lam_score", None)
    coefficients = dict(rho=float(sail_cfg.rho), lam=float(sail_cfg.lam), gamma=float(sail_cfg.gamma),
                        lam_score=None if lam_score is None else float(lam_score),
                        revkl=float(sail_cfg.get("revkl", 0.0)), xpo_alpha=float(sail_cfg.get("xpo_alpha", 0.0)))

    def terms(logps, score, lengths, batch, frozen, nash=None):
        b = batch["route"].shape[0]
        valid = batch["valid"]
        n_valid = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
        scale = n_valid * grad_accum_steps / data_parallel if fixed_scale is None else float(fixed_scale)
        per_term, metrics = sail_terms(
            logps[:b], logps[b:], batch["ref_chosen_logps"], batch["ref_rejected_logps"], batch["route"],
            beta=beta, **coefficients, baseline=sail_cfg.baseline, score_term=sail_cfg.score_term,
            released_code_scale=scale, loss_type=loss_cfg.loss_type,
            online_loss_type=sail_cfg.get("online_loss_type", ""),
            label_smoothing=float(loss_cfg.get("label_smoothing", 0.0)), score_chosen_logps=score[:b],
            score_rejected_logps=score[b:], mask=valid, baseline_state=frozen["baseline"],
            chosen_lengths=lengths[:b], rejected_lengths=lengths[b:], opponent_chosen=batch.get("opponent_chosen"),
            nash_probability=batch.get("nash_probability"), nash_weighted_logps=nash)
        return per_term, metrics, n_valid

    def objective(model, batch, frozen, rng):
        del rng
        logps, score, lengths, nash = sail_batch_logps(model, batch, score_temperature=t)
        per_term, metrics, n_valid = terms(logps, score, lengths, batch, frozen, nash)
        return jnp.sum(sum(per_term.values())) / n_valid, metrics

    objective.terms = terms
    objective.term_names = TERMS + (("xpo",) if coefficients["xpo_alpha"] else ())
    objective.score_temperature = t
    return objective


def make_term_gradient_norms(graphdef, objective):
    """``(params, batch, frozen) -> {grad_norm/<term>, grad_share/<term>}``: the parameter-gradient norm of
    each SAIL term of the batch loss, and its share of their sum. One forward pass; one backward pass
    per term (pulled back through the same log-probs), so call it at a logging cadence, not every step."""

    def norms(params, batch, frozen):
        def forward(p):
            logps, score, lengths, nash = sail_batch_logps(policy(graphdef, p, frozen), batch,
                                                           score_temperature=objective.score_temperature)
            return (logps, score, nash), lengths

        outputs, pullback, lengths = jax.vjp(forward, params, has_aux=True)

        def term_mean(outputs, name):
            per_term, _, n_valid = objective.terms(*outputs[:2], lengths, batch, frozen, outputs[2])
            return jnp.sum(per_term[name]) / n_valid

        out = {}
        for name in objective.term_names:
            out[f"grad_norm/{name}"] = optax.tree.norm(pullback(jax.grad(term_mean)(outputs, name))[0])
        total = sum(out.values())
        out.update({f"grad_share/{name}": out[f"grad_norm/{name}"] / jnp.maximum(total, 1e-12)
                    for name in objective.term_names})
        return out

    return norms
