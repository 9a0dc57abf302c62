"""One SAIL iteration at a model shape, split into generation, labelling and the train step, with two
ratios measured side by side in one run:

- the labelling program (``labeling.make_labeller``, exactly what ``OnlineLoop`` runs) against its
  floor, one policy forward and one reference forward over the k samples of every prompt, with the
  dataset pairs' reference log-probs computed in the program, read from the batch
  (``reference.precompute``), and not needed at all when every row is sampled (p = 1: the program
  without the dataset pairs, as ``OnlineLoop`` builds it then);
- SAIL's train step against the DPO step on the same labelled batch (the same objective with SAIL's
  coefficients ρ, λ, γ and RevKL's α at zero): the paper's "minimal overhead" claim;
- and the group-relative baselines on the same samples (``configs/grpo.py``, ``dr_grpo.py``,
  ``rloo.py``): their labelling program (advantages, and a reference forward where β > 0) and their
  train step on every sample, so each method's cost per update is on one table. The reward source's
  own time is left out of every row (random rewards), as it is the same for every method.

    python benchmarks/sail_iteration.py            # SmolLM2-135M shape, 8 prompts x 2 samples, 64 + 64 tokens
    python benchmarks/sail_iteration.py --quick    # the tiny shape

The main job's settings (SAIL-PP + RevKL, 30% of rows self-labelled), random weights, float32 (or
``--dtype bfloat16`` compute over float32 weights, the presets' setting), one device; medians of ``--repeats`` calls after a warm-up (compile) call.
"""

from __future__ import annotations

import argparse
import platform

import jax
import numpy as np
from common import median_time
from common import model_config as make_model_config
from flax import nnx

from sail_jax.configs import fill_defaults, sail_config
from sail_jax.group_labeling import group_labeller, group_objective
from sail_jax.labeling import draw_routes, make_labeller
from sail_jax.sail_terms import ROUTE_PP
from sail_jax.models import build_model
from sail_jax.objectives import make_sail_objective, response_logps
from sail_jax.optim import make_optimizer
from sail_jax.sail_terms import RunningBaseline
from sail_jax.sampling import generate
from sail_jax.sharding import make_mesh, shard_batch
from sail_jax.train import make_train_step
from sail_jax.trainable import prepare

NO_SAIL_TERMS = dict(rho=0.0, lam=0.0, lam_score=0.0, gamma=0.0, revkl=0.0)


def bench(name: str, prompts: int, samples: int, prompt_len: int, response_len: int, repeats: int,
          dtype: str = "float32") -> dict:
    config = sail_config("sail_pp_revkl")
    config.sail.update(num_samples=samples, log_term_grads=False)
    fill_defaults(config)  # the learning rate and caps a run would take
    model_config = make_model_config(name).replace(dtype=dtype)
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    tx = make_optimizer(config.optim, 100)
    trainable, state, shardings = prepare(build_model(model_config, seed=0), tx, mesh, config.lora, seed=0)
    ref_graphdef, ref_params = trainable.reference(state.params, shardings.params)
    rng = np.random.RandomState(0)
    vocab = model_config.vocab_size
    batch = {"prompt_ids": rng.randint(1, vocab, (prompts, prompt_len)).astype(np.int32),
             "prompt_mask": np.ones((prompts, prompt_len), np.int32), "valid": np.ones(prompts, np.int32)}
    for side in ("chosen", "rejected"):
        batch[f"{side}_response"] = rng.randint(1, vocab, (prompts, response_len)).astype(np.int32)
        batch[f"{side}_response_mask"] = np.ones((prompts, response_len), np.int32)
    policy = trainable.model(state.params)
    box = {}

    def sample():
        out = generate(policy, batch["prompt_ids"], batch["prompt_mask"], jax.random.key(0),
                       max_new_tokens=response_len, num_samples=samples, eos_ids=-1)
        box["samples"] = {"tokens": out.tokens, "mask": out.mask}
        box["logprobs"] = out.logprobs
        jax.block_until_ready(out.tokens)

    times = {"generation": median_time(sample, repeats)}
    sail = config.sail
    labellers = {pairs: make_labeller(trainable.graphdef, ref_graphdef, mesh, jax.random.key(0),
                                      beta=float(config.loss.beta), num_samples=samples,
                                      pair_selection=sail.pair_selection, pp_label_mode=sail.pp_label_mode,
                                      pr_label_mode=sail.pr_label_mode, relabel_dp=False, dataset_pairs=pairs)
                 for pairs in (True, False)}
    labeller = labellers[True]
    routes = np.asarray(draw_routes(jax.random.key(1), prompts, p_dp=0.0, p_pp=float(sail.p_pp), p_pr=0.0))
    placed = shard_batch(batch, mesh)
    inputs = (trainable.states(state.params), ref_params, placed, box["samples"],
              np.zeros((prompts, samples), np.float32), routes, 0)

    def label():
        box["train"], counts = labeller(*inputs)
        jax.block_until_ready(box["train"])

    times["labelling"] = median_time(label, repeats)
    # reference.precompute: the dataset pairs' reference log-probs ride in the batch (computed once per
    # dataset), so the program's only reference pass is over the samples.
    with_ref = dict(placed, **{f"ref_{side}_logps": box["train"][f"ref_{side}_logps"] for side in ("chosen", "rejected")})
    inputs_cached = (inputs[0], inputs[1], with_ref, *inputs[3:])
    times["labelling, reference.precompute"] = median_time(
        lambda: jax.block_until_ready(labeller(*inputs_cached)[0]), repeats)
    prompts_only = {key: placed[key] for key in ("prompt_ids", "prompt_mask", "valid")}
    every_row = (*inputs[:2], prompts_only, *inputs[3:5], np.full(prompts, ROUTE_PP, np.int32), 0)
    times["labelling, every row sampled"] = median_time(
        lambda: jax.block_until_ready(labellers[False](*every_row)[0]), repeats)
    logp = jax.jit(lambda graphdef, states, *rows: response_logps(nnx.merge(graphdef, *states), *rows)[0],
                   static_argnums=0)
    rows = (np.repeat(batch["prompt_ids"], samples, 0), np.repeat(batch["prompt_mask"], samples, 0),
            box["samples"]["tokens"], box["samples"]["mask"])
    times["labelling floor"] = (
        median_time(lambda: jax.block_until_ready(logp(trainable.graphdef, trainable.states(state.params), *rows)),
                    repeats)
        + median_time(lambda: jax.block_until_ready(logp(ref_graphdef, (ref_params,), *rows)), repeats))
    frozen = {"baseline": RunningBaseline.init(), **trainable.frozen}
    frozen_shardings = {"baseline": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                        **trainable.frozen_shardings}
    for label_, overrides in (("train step (SAIL)", {}), ("train step (DPO)", NO_SAIL_TERMS)):
        sail_cfg = config.sail.copy_and_resolve_references()
        sail_cfg.update(overrides)
        objective = make_sail_objective(config.loss, sail_cfg, score_temperature=1.0)
        step = make_train_step(trainable.graphdef, tx, objective, mesh, shardings, frozen_shardings, seed=0)
        box["state"] = jax.tree.map(lambda x: x.copy(), state)

        def run():
            box["state"], metrics = step(box["state"], box["train"], frozen)
            jax.block_until_ready(metrics["loss"])

        times[label_] = median_time(run, repeats)
    for method in ("grpo", "dr_grpo", "rloo"):
        times.update(group_method(method, trainable, state, shardings, tx, ref_graphdef, ref_params, mesh,
                                  prompts_only, box, samples, repeats, frozen, frozen_shardings))
    return times


def group_method(variant, trainable, state, shardings, tx, ref_graphdef, ref_params, mesh, prompts, box, samples,
                 repeats, frozen, frozen_shardings) -> dict:
    """A group method's labelling program and train step (its shipped config's settings) on the samples."""
    pg = sail_config(variant).pg
    labeller = group_labeller(ref_graphdef, mesh, pg, num_samples=samples, temperature=1.0, ratio_needs_old=False)
    rows = {**box["samples"], "logprobs": box["logprobs"]}
    rewards = np.random.RandomState(1).normal(size=rows["tokens"].shape[0]).astype(np.float32)
    out = {}

    def label():
        box["group"], _ = labeller(ref_params, prompts, rows, rewards)
        jax.block_until_ready(box["group"])

    out[f"labelling ({variant})"] = median_time(label, repeats)
    objective = group_objective(pg, max_completion_length=rows["tokens"].shape[1], temperature=1.0)
    step = make_train_step(trainable.graphdef, tx, objective, mesh, shardings, frozen_shardings, seed=0)
    box["state"] = jax.tree.map(lambda x: x.copy(), state)

    def run():
        box["state"], metrics = step(box["state"], box["group"], frozen)
        jax.block_until_ready(metrics["loss"])

    out[f"train step ({variant})"] = median_time(run, repeats)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="compute dtype, float32 or bfloat16 (weights, optimizer "
                                                            "state, log-softmax and losses stay float32, as in the presets)")
    args = parser.parse_args()
    name = "tiny" if args.quick else "smollm2-135m"
    t = bench(name, args.prompts, args.samples, 64, 64, args.repeats, args.dtype)
    print(f"{platform.machine()}, {jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}; "
          f"{name}, {args.prompts} prompts x {args.samples} samples, 64 + 64 tokens, {args.dtype}")
    iteration = t["generation"] + t["labelling"] + t["train step (SAIL)"]
    print("| part | seconds | share of the iteration |")
    print("|---|---|---|")
    for part in ("generation", "labelling", "train step (SAIL)"):
        print(f"| {part} | {t[part]:.3f} | {t[part] / iteration:.0%} |")
    print(f"\nlabelling vs its floor (one policy + one reference forward over the samples, {t['labelling floor']:.3f} s):")
    for key in ("labelling", "labelling, reference.precompute", "labelling, every row sampled"):
        print(f"  {key}: {t[key]:.3f} s, {t[key] / t['labelling floor']:.2f}x")
    print(f"SAIL train step {t['train step (SAIL)']:.3f} s vs the DPO step on the same batch (SAIL's "
          f"coefficients 0) {t['train step (DPO)']:.3f} s: {t['train step (SAIL)'] / t['train step (DPO)']:.3f}x")
    print(f"\nper update, on the same {args.prompts} x {args.samples} samples (generation {t['generation']:.3f} s "
          "for every method; rewards not included):")
    print("| method | labelling (s) | train step (s) | generation + labelling + step (s) |")
    print("|---|---|---|---|")
    for method, label, step in (("SAIL-PP + RevKL (p = 0.3)", "labelling", "train step (SAIL)"),
                                ("SAIL-PP + RevKL, every row sampled (p = 1)", "labelling, every row sampled",
                                 "train step (SAIL)"),
                                *((v, f"labelling ({v})", f"train step ({v})") for v in ("grpo", "dr_grpo", "rloo"))):
        print(f"| {method} | {t[label]:.3f} | {t[step]:.3f} | {t['generation'] + t[label] + t[step]:.3f} |")


if __name__ == "__main__":
    main()
