"""The SAIL online loop (../shared/SAIL.md): route -> sample -> label -> one jitted step -> log/eval.

Per step, for a batch of prompts with their dataset pairs (or prompts alone, when every row is sampled):
  1. route each example (offline / DP / PP / PR) with ``sail.p_dp/p_pp/p_pr``;
  2. PP/PR examples take k samples per prompt from the current policy (the jitted sampler), drawn in
     blocks of ``generation.interval`` batches, each batch used ``generation.reuse`` times;
  3. label: PP by the policy's implicit reward (current θ), PR by the reward source, DP by
     resampling the dataset label from the policy; ties under argmax are dropped and counted;
  4. one train step on ``sail_loss``; reference log-probs come from the labelling pass, the
     reference model itself is never updated (unless ``reference.sync_every`` asks for TR-DPO sync).

Every random draw comes from ``fold_in(key(seed), step)``, and checkpoints fall on generation-block
boundaries, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sail_jax.configs import fill_defaults
from sail_jax.data.buckets import Buckets, ShapeLog, pad_right
from sail_jax.data.pipeline import train_iterator
from sail_jax.distributed import global_array, to_host
from sail_jax.driver import drive
from sail_jax.evaluate import Evaluator, decode_responses, distinct_n, make_logp_fn
from sail_jax.group_labeling import group_labeller, group_objective, needs_old_logps
from sail_jax.labeling import GEN_KEY, ROUTE_KEY, draw_routes, every_row_sampled, make_labeller, step_key
from sail_jax.objectives import make_sail_objective, make_term_gradient_norms, response_logps
from sail_jax.sail_terms import (ROUTE_PP, ROUTE_PR, RunningBaseline, implicit_log_likelihood,
                                 update_running_baseline)
from sail_jax.optim import make_optimizer
from sail_jax.reference_cache import KEYS as REF_KEYS
from sail_jax.reference_cache import attach_reference_logps
from sail_jax.sampling import GeometricMixture, generate
from sail_jax.sharding import batch_sharding, data_parallel_size
from sail_jax.train import checkpoint_dir, make_train_step
from sail_jax.trainable import prepare


@jax.jit
def _blend(reference, params, alpha):
    """TR-DPO soft sync: ``alpha·π + (1 − alpha)·π_ref`` (shardings follow the inputs)."""
    return jax.tree.map(lambda r, p: alpha * p + (1 - alpha) * r, reference, params)


@dataclasses.dataclass
class Block:
    """Samples for ``interval`` prompt batches, generated at ``step`` by the policy of that moment."""

    step: int
    batches: list[dict[str, np.ndarray]]
    samples: list[dict[str, np.ndarray]]  # tokens/mask/finished [b*k, T] per batch, prompt-major
    gen_seconds: float
    gen_tokens: int
    distinct_2: float | None = None  # mean per-response distinct-2 of the samples (degeneration shows here)


class OnlineLoop:
    """Owns the train state, the reference, the prompt iterator and the generation buffer."""

    def __init__(self, config, *, model, tokenizer, mesh, train_arrays, train_prompts, reward_source, evaluator_args,
                 workdir, eval_reward_source=None):
        fill_defaults(config)  # a loop built by hand (not through the recipe's validation) gets the same defaults
        self.config, self.tokenizer, self.mesh, self.workdir = config, tokenizer, mesh, workdir
        self.sail, self.gen = config.sail, config.generation
        self.beta = float(config.loss.beta)
        self.block_len = int(self.gen.interval) * int(self.gen.reuse)
        self.needs_samples = float(self.sail.p_pp) + float(self.sail.p_pr) > 0
        self.dataset_pairs = not every_row_sampled(self.sail)  # else prompts are all the loop needs
        self.tx = make_optimizer(config.optim, config.steps)
        self.trainable, self.state, self.shardings = prepare(model, self.tx, mesh, config.lora, seed=config.seed)
        self.graphdef = self.trainable.graphdef
        # The reference: a copy of the initial policy, or with LoRA the base itself (adapters off).
        self.ref_graphdef, self.ref_params = self.trainable.reference(self.state.params, self.shardings.params)
        replicated = NamedSharding(mesh, P())
        self.frozen_shardings = {"baseline": replicated, **self.trainable.frozen_shardings}
        self.pg = config.pg
        self.old_logps = bool(self.pg.method) and needs_old_logps(self.pg.method, float(self.pg.beta), self.block_len)
        objective = self._make_objective()
        self.train_step = make_train_step(self.graphdef, self.tx, objective, mesh, self.shardings,
                                          self.frozen_shardings, seed=config.seed)
        self.log_term_grads = bool(self.sail.get("log_term_grads", False))  # validation: SAIL's objective only
        if self.log_term_grads:
            self.term_gradient_norms = jax.jit(make_term_gradient_norms(self.graphdef, objective))
        self._batch_ell = jax.jit(lambda states, batch: implicit_log_likelihood(
            *(response_logps(nnx.merge(self.graphdef, *states), batch["prompt_ids"], batch["prompt_mask"],
                             batch[f"{s}_response"], batch[f"{s}_response_mask"])[0] for s in ("chosen", "rejected")),
            batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta=self.beta))
        self.baseline = RunningBaseline.init()
        self.buckets, self.shapes = Buckets.from_config(config.data), ShapeLog()
        if config.reference.get("precompute", False) and self.dataset_pairs:  # no pair's log-prob is read
            self._precompute_reference(train_arrays)
        # The whole global batch on every process: labelling is replicated, each process trains on its rows.
        d = config.data
        self.prompts = train_iterator(train_arrays, config.batch_size, seed=config.seed, buckets=self.buckets,
                                      shuffle=d.shuffle, group_by_length=d.group_by_length,
                                      group_window=d.group_window)
        self.reward_source = reward_source
        self.train_prompts = train_prompts  # record prompts by row, for reward sources that read text
        self.key = jax.random.key(config.seed)
        self._labeller = self._make_labeller()
        self.block: Block | None = None
        self.seconds = {"generation": 0.0, "steps": 0.0}  # totals of this process's run, for summaries
        self._since_log = {"generation": 0.0, "steps": 0.0, "count": 0}
        self._last_end, self._evaluating = None, 0.0  # when the last step ended; evaluation seconds since
        self.evaluator = None if evaluator_args is None else Evaluator(  # None: no held-out set
            self.graphdef, (self.ref_graphdef, self.ref_params), reward_source=eval_reward_source or reward_source,
            tokenizer=tokenizer, gen_cfg=self.gen, beta=self.beta, seed=config.seed + 1,
            missing_eos_penalty=float(config.reward.missing_eos_penalty), mesh=mesh, **evaluator_args)

    def _make_objective(self):
        """SAIL's per-route pairwise loss, or with ``pg.method`` a group-relative policy gradient."""
        if not self.pg.method:
            return make_sail_objective(self.config.loss, self.sail, score_temperature=self._score_temperature(),
                                       data_parallel=data_parallel_size(self.mesh),
                                       grad_accum_steps=int(self.config.optim.grad_accum_steps))
        return group_objective(self.pg, max_completion_length=int(self.gen.max_new_tokens),
                               temperature=float(self.gen.temperature))

    def _precompute_reference(self, arrays):
        """``reference.precompute``: the dataset pairs' reference log-probs, once, into the batches."""
        logp = make_logp_fn(self.ref_graphdef)  # the rows arrive placed on the mesh

        def pair(b):
            return tuple(logp(self.ref_params, b["prompt_ids"], b["prompt_mask"], b[f"{s}_response"],
                              b[f"{s}_response_mask"]) for s in ("chosen", "rejected"))

        attach_reference_logps(arrays, pair, batch_size=int(self.config.eval_batch_size), mesh=self.mesh,
                               cache_path=os.path.join(self.workdir, "reference_logps_train.npz"),
                               desc="reference log-probs (train pairs)", buckets=self.buckets)

    def _score_temperature(self) -> float:
        """S's (and RevKL's) log-probs follow the sampling temperature; the released code used temperature 1."""
        if self.sail.score_term == "released_code":
            return 1.0
        t = self.sail.get("score_temperature", None)
        return float(self.gen.temperature if t is None else t)

    def policy_params(self) -> tuple:
        """The current policy's parameters as the logp functions and the evaluator take them."""
        return self.trainable.states(self.state.params)

    def _key(self, kind: int, step: int) -> jax.Array:
        return step_key(self.key, kind, step)

    # ------------------------------------------------------------------ generation buffer
    def _generate_block(self, step: int) -> Block:
        batches = [next(self.prompts) for _ in range(int(self.gen.interval))]
        samples, seconds, tokens = [], 0.0, 0
        if self.needs_samples:
            model = self.trainable.model(self.state.params)  # adapters applied, not merged (docs/training.md: LoRA)
            for i, batch in enumerate(batches):
                t0 = time.time()
                ids, mask, finished, logprobs = self._sample(model, batch, self._key(GEN_KEY, step * 1000 + i))
                # the response width: the bucket of the longest sample (label() widens it to the pairs')
                width = self.buckets.length(int(mask.sum(1).max()), int(self.config.data.max_response_length))
                s = {"tokens": pad_right(ids, width, self.tokenizer.pad_id), "mask": pad_right(mask, width),
                     "finished": finished}
                if self.old_logps:  # the sampling policy's own log-probs (group_labeling says when they are π_old)
                    s["logprobs"] = pad_right(logprobs, width)
                seconds += time.time() - t0
                tokens += int(s["mask"].sum())
                samples.append(s)
        distinct = float(np.mean([distinct_n(s["tokens"], s["mask"], 2) for s in samples])) if samples else None
        return Block(step, batches, samples, seconds, tokens, distinct)

    def _sample(self, model, batch, key) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Tokens, masks, finished flags and the sampler's per-token log-probs of ``num_samples``
        responses per prompt from the policy (prompt-major, on the host; one for
        SPIN); with ``sail.opponent=reference`` (XPO) the second of each prompt's two is the reference's,
        with ``mixture`` (Nash-MD) the geometric mixture's of policy and reference (``sail.mixture_coef``)."""
        def draw(m, key, k):
            out = generate(m, batch["prompt_ids"], batch["prompt_mask"], key,
                           max_new_tokens=int(self.gen.max_new_tokens), temperature=float(self.gen.temperature),
                           top_k=int(self.gen.top_k),
                           top_p=float(self.gen.top_p), eos_ids=self.tokenizer.eos_id, num_samples=k,
                           pad_id=self.tokenizer.pad_id, batch_sharding=batch_sharding(self.mesh),
                           slots=int(self.gen.get("slots", 0)))
            return [np.asarray(to_host(x)) for x in (out.tokens, out.mask, out.finished, out.logprobs)]

        opponent = self.sail.get("opponent", "policy")
        if opponent not in ("reference", "mixture"):
            return tuple(draw(model, key, int(self.sail.num_samples)))
        own = draw(model, key, 1)
        reference = nnx.merge(self.ref_graphdef, self.ref_params)
        if opponent == "mixture":
            reference = GeometricMixture(model, reference, float(self.sail.mixture_coef))
        theirs = draw(reference, jax.random.fold_in(key, 1), 1)
        return tuple(np.stack([a, b], axis=1).reshape((-1,) + a.shape[1:]) for a, b in zip(own, theirs))

    # ------------------------------------------------------------------ labelling
    def _make_labeller(self):
        """Labelling as one jitted program on the mesh (``labeling.make_labeller``, or with ``pg.method``
        ``group_labeling.make_group_labeller``)."""
        sail, pg = self.sail, self.pg
        if pg.method:
            return group_labeller(self.ref_graphdef, self.mesh, pg, num_samples=int(sail.num_samples),
                                  temperature=float(self.gen.temperature), ratio_needs_old=self.block_len > 1)
        return make_labeller(self.graphdef, self.ref_graphdef, self.mesh, self.key, beta=self.beta,
                             num_samples=int(sail.num_samples), pair_selection=sail.pair_selection,
                             pp_label_mode=sail.pp_label_mode, pr_label_mode=sail.pr_label_mode,
                             relabel_dp=float(sail.p_dp) > 0, opponent=sail.get("opponent", "policy"),
                             dataset_pairs=self.dataset_pairs, self_labelled=float(sail.p_pp) > 0)

    def _rewards(self, batch: dict, samples: dict, rows: np.ndarray) -> np.ndarray:
        """The reward source's scores ``[len(rows), k]`` of the samples of the batch's ``rows``, less the
        missing-EOS penalty for a sample that did not end."""
        k = int(self.sail.num_samples)
        flat = (rows[:, None] * k + np.arange(k)).reshape(-1)
        texts = decode_responses(self.tokenizer, samples["tokens"][flat], samples["mask"][flat])
        prompts = [self.train_prompts[batch["index"][i]] for i in rows for _ in range(k)]
        unfinished = ~samples["finished"][flat].astype(bool)
        scores = (np.asarray(self.reward_source(prompts, texts), np.float32)
                  - float(self.config.reward.missing_eos_penalty) * unfinished)
        return scores.reshape(len(rows), k)

    def _label_groups(self, batch: dict, samples: dict) -> tuple[dict, dict]:
        """``pg.method``: every sample a train row with its advantage (``group_labeling``)."""
        placed = lambda tree: jax.tree.map(lambda x: global_array(x, batch_sharding(self.mesh)), tree)  # noqa: E731
        rewards = self._rewards(batch, samples, np.arange(len(batch["valid"]))).reshape(-1)
        rows = placed({key: batch[key] for key in ("prompt_ids", "prompt_mask", "valid")})
        sample_rows = placed({key: samples[key] for key in ("tokens", "mask", "logprobs") if key in samples})
        out, stats = self._labeller(self.ref_params, rows, sample_rows, placed(rewards))
        return out, {**{name: float(v) for name, v in jax.device_get(stats).items()}, **self.shapes.metrics(out)}

    def label(self, step: int, batch: dict, samples: dict | None) -> tuple[dict, dict]:
        """The train batch (pair per example, per its route; global arrays on the mesh) and the labelling
        metrics. The host draws the routes, and decodes and scores only the PR rows' samples."""
        if self.pg.method:
            return self._label_groups(batch, samples)
        b = len(batch["valid"])
        routes = np.asarray(draw_routes(self._key(ROUTE_KEY, step), b, p_dp=float(self.sail.p_dp),
                                        p_pp=float(self.sail.p_pp), p_pr=float(self.sail.p_pr)))
        sampled = (routes == ROUTE_PP) | (routes == ROUTE_PR)
        if sampled.any() and samples is None:
            raise RuntimeError("PP/PR examples were routed but no samples were generated")
        if not self.dataset_pairs and not sampled.all():
            raise RuntimeError(f"routes {routes.tolist()}: with p_pp + p_pr = 1 every row must be sampled")
        metrics: dict[str, float] = {}
        k = int(self.sail.num_samples)
        reward = np.zeros((b, k), np.float32)
        pr_rows = np.where(routes == ROUTE_PR)[0]
        if samples is not None and len(pr_rows) and self.reward_source is not None:  # None: SPIN reads no reward
            reward[pr_rows] = self._rewards(batch, samples, pr_rows)
            metrics["pr/sample_reward"] = float(reward[pr_rows].mean())
        sharding = batch_sharding(self.mesh)
        pairs = ("chosen_response", "chosen_response_mask", "rejected_response", "rejected_response_mask", *REF_KEYS)
        keys = ("prompt_ids", "prompt_mask", "valid") + (pairs if self.dataset_pairs else ())
        rows = {key: batch[key] for key in keys if key in batch}
        if samples is not None and self.dataset_pairs:  # one response width for the pairs and the samples
            width = max(samples["tokens"].shape[1], rows["chosen_response"].shape[1])
            samples = {**samples, "tokens": pad_right(samples["tokens"], width, self.tokenizer.pad_id),
                       "mask": pad_right(samples["mask"], width)}
            rows.update({k: pad_right(rows[k], width, self.tokenizer.pad_id if k.endswith("response") else 0)
                         for k in pairs[:4]})
        placed = lambda tree: jax.tree.map(lambda x: global_array(x, sharding), tree)  # noqa: E731
        sample_rows = None if samples is None else placed({"tokens": samples["tokens"], "mask": samples["mask"]})
        out, counts = self._labeller(self.policy_params(), self.ref_params, placed(rows), sample_rows,
                                     placed(reward), placed(routes.astype(np.int32)), step)
        counts = {name: int(v) for name, v in jax.device_get(counts).items()}
        metrics.update(self.shapes.metrics(out))
        if counts["dp_rows"] and "dp_swaps" in counts:
            metrics["labels/dp_flip_rate"] = counts["dp_swaps"] / counts["dp_rows"]
        if counts["sampled_rows"] and "ties_dropped" in counts:
            metrics["labels/ties_dropped"] = float(counts["ties_dropped"])
            if counts["pp_rows"]:
                metrics["labels/pp_flip_rate"] = counts["pp_flips"] / counts["pp_rows"]
        return out, metrics

    # ------------------------------------------------------------------ the loop
    def step(self, step: int) -> dict[str, float]:
        # A step's time runs from the end of the previous one (the driver's logging and checkpoints
        # between them included, evaluations not), so the steps' times add up to the run's.
        t0 = time.time() if self._last_end is None else self._last_end
        if self.block is None or step % self.block_len == 0:
            self.block = self._generate_block(step)
        index = (step % self.block_len) // int(self.gen.reuse)
        batch = self.block.batches[index]
        samples = self.block.samples[index] if self.block.samples else None
        # Every process holds the same global host batch and samples (same keys, gathered samples) and
        # places its own rows of them; the labelled batch comes back on the mesh.
        placed, metrics = self.label(step, batch, samples)
        self._update_running_baseline(placed)
        frozen = {"baseline": self.baseline_for_step, **self.trainable.frozen}
        if self.log_term_grads and (step + 1) % int(self.config.log_every) == 0:  # before the step donates the state
            metrics.update(self.term_gradient_norms(self.state.params, placed, frozen))
        self.state, step_metrics = self.train_step(self.state, placed, frozen)
        self._maybe_sync_reference(step + 1)
        jax.block_until_ready(step_metrics)  # the clock stops when the step has run, not when it was dispatched
        self._last_end = time.time()
        elapsed, self._evaluating = self._last_end - t0 - self._evaluating, 0.0
        gen_seconds = self.block.gen_seconds if step % self.block_len == 0 else 0.0
        for totals in (self.seconds, self._since_log):
            totals["generation"] += gen_seconds
            totals["steps"] += elapsed
        self._since_log["count"] += 1
        # Over the steps since the last logged one (the driver logs only every log_every-th step's metrics).
        interval = self._since_log
        metrics.update({"buffer/staleness": float(step - self.block.step),
                        "time/step_seconds": interval["steps"] / interval["count"],
                        "gen/time_share": interval["generation"] / max(interval["steps"], 1e-9)})
        if (step + 1) % int(self.config.log_every) == 0 or step + 1 == int(self.config.steps):
            self._since_log = {"generation": 0.0, "steps": 0.0, "count": 0}
        if self.block.gen_seconds:
            metrics["gen/tokens_per_second"] = self.block.gen_tokens / self.block.gen_seconds
        if self.block.distinct_2 is not None:
            metrics["gen/distinct_2"] = self.block.distinct_2
        return {**metrics, **step_metrics}

    def _update_running_baseline(self, batch):
        """The step reads the running baseline *before* this batch is folded in (it must not depend
        on the example's own sample); ℓ is computed from the labelling pass's log-probs."""
        self.baseline_for_step = self.baseline
        if self.sail.baseline != "running" or self.pg.method:
            return
        ell = self._batch_ell(self.policy_params(), batch)
        self.baseline = update_running_baseline(self.baseline, ell, batch["route"], batch["valid"],
                                                decay=float(self.sail.baseline_decay))

    def _maybe_sync_reference(self, done: int):
        every = int(self.config.reference.sync_every)
        if every > 0 and done % every == 0:
            self.ref_params = _blend(self.ref_params, self.state.params,
                                     jnp.float32(self.config.reference.sync_alpha))

    def export_model(self):
        """The current policy as one plain nnx model (LoRA adapters merged; for ``save_pretrained``)."""
        return self.trainable.export_model(self.state.params)

    def checkpoint_extra(self) -> dict:
        return {"data": self.prompts.get_state(), **self.trainable.checkpoint_extra(),
                "baseline": {"mean": np.asarray(self.baseline.mean).tolist(),
                             "initialized": np.asarray(self.baseline.initialized).tolist()}}

    def load_extra(self, extra: dict) -> None:
        self.trainable.check_checkpoint(extra, checkpoint_dir(self.config, self.workdir))
        self.prompts.set_state(extra["data"])
        self.baseline = RunningBaseline(mean=jnp.asarray(extra["baseline"]["mean"], jnp.float32),
                                        initialized=jnp.asarray(extra["baseline"]["initialized"], jnp.bool_))
        if int(self.config.reference.sync_every) > 0:
            logging.warning("reference.sync_every is set: the synced reference is not checkpointed; it restarts "
                            "from the initial policy on resume")

    def evaluate(self) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        t0 = time.time()
        metrics = self.evaluator(self.policy_params())
        self._evaluating += time.time() - t0
        return metrics

    def completions(self) -> list[dict]:
        """The latest evaluation's first ``log_completions`` prompts with the reference's and the
        policy's samples and rewards (completions.jsonl and TensorBoard text)."""
        if self.evaluator is None:
            return []
        return [dict(zip(("prompt", "reference", "reference_reward", "policy", "policy_reward"), row))
                for row in self.evaluator.sample_table(int(self.config.get("log_completions", 8)))]

    def can_checkpoint(self, done: int) -> bool:
        """Only between generation blocks: the block's samples and prompts are not checkpointed."""
        return done % self.block_len == 0

    def run(self, data_counts: dict[str, float] | None = None) -> tuple[dict[str, float], dict[str, float]]:
        """Train to ``config.steps`` (resuming if a checkpoint exists); returns (first eval, last eval).
        ``data_counts`` (rows skipped per split) go to metrics.jsonl as split "data"."""
        initial = {} if self.evaluator is None else self.evaluator.reference_metrics()
        return initial, drive(self, self.config, self.workdir, desc="sail",
                              step0={"eval": initial, "data": data_counts or {}})
