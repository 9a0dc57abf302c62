"""Evaluation of a policy against its reference on held-out prompts and pairs.

  reward      mean reward-source (oracle) score of policy samples (minus the missing-EOS penalty)
  score       the same before the penalty (for the IFEval-style task: the constraint satisfaction rate)
  win_rate    P(policy sample beats the reference's sample for the same prompt), ties count half
  kl          KL(π‖π_ref) estimated on policy samples at temperature 1: mean of log π(y) − log π_ref(y)
  distinct_2  per-response distinct-2 of the policy samples (degenerate repetition drives it down)
  heldout/*   implicit-reward margin and accuracy on held-out preference pairs (TRL names), when
              the held-out set has pairs

With no reward source (a run on the user's own model and data that names none), reward, score and
win_rate are left out, and the rest is reported.

The reference's samples and its log-probs of the held-out pairs are computed once; every evaluation
uses the same key, so curves compare like with like.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sail_jax.data.buckets import NO_BUCKETS, Buckets, trim
from sail_jax.distributed import global_array, to_host
from sail_jax.losses import preference_metrics
from sail_jax.objectives import response_logps
from sail_jax.progress import bar
from sail_jax.sampling import generate
from sail_jax.sharding import batch_sharding, data_parallel_size


def as_states(params) -> tuple:
    """A model's parameters as the tuple ``nnx.merge`` takes: one state, or (LoRA) adapters and base."""
    return params if isinstance(params, tuple) else (params,)


def make_logp_fn(graphdef, mesh=None):
    """``(params, prompt_ids, prompt_mask, response, response_mask) -> log π(response|prompt)``, a host
    array [n], jitted; ``params`` is one state or a tuple of states (see ``as_states``). Every process
    passes the same host rows; they are placed on the mesh over the batch axes when they divide (else
    replicated), so no device computes every row."""
    fn = jax.jit(lambda states, p, pm, r, rm: response_logps(nnx.merge(graphdef, *states), p, pm, r, rm)[0])
    if mesh is None:
        return lambda params, *rows: np.asarray(fn(as_states(params), *rows))

    def logp(params, *rows):
        rows = [np.asarray(x) for x in rows]
        sharding = batch_sharding(mesh) if len(rows[0]) % data_parallel_size(mesh) == 0 else NamedSharding(mesh, P())
        return np.asarray(to_host(fn(as_states(params), *(global_array(x, sharding) for x in rows))))

    return logp


# What "healthy" means for the built-in task's main job (tests and the study read these): the oracle
# reward well above SFT's ≈ 0, the policy near its reference, and text that does not loop.
HEALTH_BOUNDS = {"reward": (0.5, None), "kl": (None, 5.0), "distinct_2": (0.95, None)}


def health_problems(metrics: dict, bounds: dict = HEALTH_BOUNDS) -> list[str]:
    """The bounds an evaluation breaks, as readable strings (empty: healthy)."""
    problems = []
    for key, (low, high) in bounds.items():
        if key not in metrics:  # reward, with no reward source to score it
            continue
        if low is not None and not metrics[key] >= low:
            problems.append(f"{key} {metrics[key]:.3f} < {low}")
        if high is not None and not metrics[key] <= high:
            problems.append(f"{key} {metrics[key]:.3f} > {high}")
    return problems


def distinct_n(tokens: np.ndarray, mask: np.ndarray, n: int = 2) -> float:
    """Mean over responses of (distinct n-grams / n-grams) among each response's tokens: 1 for text that
    never repeats itself, falling as it loops ("feels feels looks feels looks ..." scores 0.5).
    Responses shorter than n tokens count as 1."""
    scores = []
    for row, m in zip(np.asarray(tokens), np.asarray(mask).astype(bool)):
        t = row[m].tolist()
        grams = [tuple(t[i:i + n]) for i in range(len(t) - n + 1)]
        scores.append(len(set(grams)) / len(grams) if grams else 1.0)
    return float(np.mean(scores)) if scores else 1.0


def decode_responses(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    return [tokenizer.decode(t[m.astype(bool)]) for t, m in zip(tokens, mask)]


class Evaluator:
    """``evaluator(params)``: the metrics above for the policy ``nnx.merge(graphdef, *as_states(params))``.
    ``reference`` is ``(graphdef, params)`` of the reference policy (with LoRA: the base's own graph)."""

    def __init__(self, graphdef, reference, *, prompts, eval_arrays, reward_source, tokenizer, gen_cfg,
                 beta: float, batch_size: int, seed: int, missing_eos_penalty: float = 0.0, mesh=None,
                 buckets: Buckets = NO_BUCKETS):
        self.prompts, self.arrays, self.buckets = prompts, eval_arrays, buckets
        self.reward_source, self.tokenizer, self.gen_cfg = reward_source, tokenizer, gen_cfg
        self.beta, self.batch_size, self.penalty = beta, batch_size, missing_eos_penalty
        self.policy = (graphdef, make_logp_fn(graphdef, mesh))
        ref_graphdef, self.ref_params = reference
        self.ref = (ref_graphdef, make_logp_fn(ref_graphdef, mesh))
        # Across processes, sampling inputs must be placed on the mesh; one process keeps jit's choice.
        self.sampling_sharding = batch_sharding(mesh) if mesh is not None and jax.process_count() > 1 else None
        self.key = jax.random.key(seed)
        self.reference = self._samples(self.ref, self.ref_params, jax.random.fold_in(self.key, 1))
        self.has_pairs = "chosen_response" in eval_arrays
        self.reference_pair_logps = self._pair_logps(self.ref[1], self.ref_params) if self.has_pairs else None
        self.last = self.reference  # the policy samples of the latest evaluation

    def _chunks(self):
        n = len(self.prompts)
        for i in range(0, n, self.batch_size):
            idx = np.arange(i, i + self.batch_size) % n  # the last chunk wraps: one compiled shape
            yield idx, min(self.batch_size, n - i)

    def _samples(self, which, params, key):
        """Samples of ``which`` (``(graphdef, logp)``) at temperature 1, with their rewards and their
        log-probs under it and under the reference."""
        graphdef, logp = which
        model = nnx.merge(graphdef, *as_states(params))
        out = {"tokens": [], "mask": [], "finished": [], "logp": [], "ref_logp": []}
        chunks = list(self._chunks())
        for c, (idx, keep) in enumerate(bar(chunks, f"evaluating on {len(self.prompts)} held-out prompts")):
            p, pm = self._rows(idx, "prompt_ids", "prompt_mask")
            s = generate(model, p, pm, jax.random.fold_in(key, c), max_new_tokens=self.gen_cfg.max_new_tokens,
                         temperature=1.0, eos_ids=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                         batch_sharding=self.sampling_sharding, slots=int(self.gen_cfg.get("slots", 0)))
            tokens, mask, finished = (np.asarray(to_host(x)) for x in (s.tokens, s.mask, s.finished))
            width = self.buckets.length(int(mask.sum(1).max()), tokens.shape[1])
            cut = tokens[:, :width], mask[:, :width]  # what the log-prob passes read
            out["logp"].append(logp(params, p, pm, *cut)[:keep])
            out["ref_logp"].append(self.ref[1](self.ref_params, p, pm, *cut)[:keep])
            out["tokens"].append(tokens[:keep])  # full width: the chunks' buckets differ
            out["mask"].append(mask[:keep])
            out["finished"].append(finished[:keep])
        out = {k: np.concatenate(v) for k, v in out.items()}
        texts = decode_responses(self.tokenizer, out["tokens"], out["mask"])
        if self.reward_source is not None:
            out["score"] = self.reward_source(self.prompts, texts)
            out["reward"] = out["score"] - self.penalty * (~out["finished"].astype(bool))
        out["texts"] = texts
        return out

    def __call__(self, params) -> dict[str, float]:
        return self._metrics(self.policy, params)

    def reference_metrics(self) -> dict[str, float]:
        """The same metrics for the reference policy itself (its own samples, with the policy's key)."""
        return self._metrics(self.ref, self.ref_params)

    def _metrics(self, which, params) -> dict[str, float]:
        pol = self.last = self._samples(which, params, jax.random.fold_in(self.key, 2))
        ref = self.reference
        metrics = {} if self.reward_source is None else {
            "reward": float(np.mean(pol["reward"])),
            "score": float(np.mean(pol["score"])),
            "reference_reward": float(np.mean(ref["reward"])),
            "win_rate": float(np.mean(pol["reward"] > ref["reward"]) + 0.5 * np.mean(pol["reward"] == ref["reward"])),
        }
        metrics |= {
            "kl": float(np.mean(pol["logp"] - pol["ref_logp"])),
            "response_length": float(np.mean(pol["mask"].sum(1))),
            "finished": float(np.mean(pol["finished"])),
            "distinct_2": distinct_n(pol["tokens"], pol["mask"], 2),
        }
        if self.has_pairs:
            metrics.update(self._heldout_pairs(which[1], params))
        return metrics

    def _pair_logps(self, logp, params) -> dict[str, np.ndarray]:
        """log π(response | prompt) of each held-out pair's chosen and rejected response."""
        out = {}
        for side in ("chosen", "rejected"):
            fields = ("prompt_ids", "prompt_mask", f"{side}_response", f"{side}_response_mask")
            out[side] = np.concatenate([logp(params, *self._rows(idx, *fields))[:keep]
                                        for idx, keep in self._chunks()])
        return out

    def _rows(self, idx, *fields) -> list[np.ndarray]:
        """``fields`` of the held-out rows ``idx``, cut to their length buckets."""
        rows = trim({k: self.arrays[k][idx] for k in fields}, self.buckets)
        return [rows[k] for k in fields]

    def _heldout_pairs(self, logp, params) -> dict[str, float]:
        pol, ref = self._pair_logps(logp, params), self.reference_pair_logps
        m = preference_metrics(jnp.asarray(pol["chosen"]), jnp.asarray(pol["rejected"]), jnp.asarray(ref["chosen"]),
                               jnp.asarray(ref["rejected"]), beta=self.beta)
        return {f"heldout/{k}": float(v) for k, v in m.items() if k.startswith("rewards/")}

    def sample_table(self, n: int = 4) -> list[tuple[str, str, float | None, str, float | None]]:
        """A few (prompt, reference response, reward, latest policy response, reward) rows for the summary
        (rewards None with no reward source)."""
        pol, ref = self.last, self.reference
        reward = (lambda s, i: None) if self.reward_source is None else (lambda s, i: float(s["reward"][i]))  # noqa: E731
        return [(str(self.prompts[i]), ref["texts"][i], reward(ref, i), pol["texts"][i], reward(pol, i))
                for i in range(min(n, len(self.prompts)))]
