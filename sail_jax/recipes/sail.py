"""The main job: SAIL online alignment, by default on the built-in task, end to end.

With no ``model.path`` the task named by ``task.name`` is prepared in ``task.dir`` (once; later runs
reuse it; see ``sail_jax.tasks``): its starting policy, an oracle-labelled offline preference set and
a held-out set. Then the online loop runs, evaluates against the reference policy, and writes a
summary table, a plot, checkpoints, metrics and the exported policy into the workdir.
"""

from __future__ import annotations

import json
import os

import jax

from sail_jax.configs import model_options
from sail_jax.data.buckets import Buckets
from sail_jax.data.pipeline import encode_online, has_eval_set, load_records
from sail_jax.models import load_pretrained
from sail_jax.online import OnlineLoop
from sail_jax.progress import say
from sail_jax.rewards import make_eval_reward_source, make_reward_source, reward_configured
from sail_jax.sharding import make_mesh, sharding_fn
from sail_jax.tasks import TASK_NAMES
from sail_jax.tasks.prepare import prepare_task
from sail_jax.tokenization import Tokenizer
from sail_jax.trainable import export_policy
from sail_jax.validation import validate_online_config
from sail_jax.workdir import write_summary


def run(config, workdir: str) -> dict:
    validate_online_config(config)  # before the task is built: bad values fail before any work
    os.makedirs(workdir, exist_ok=True)
    builtin = not config.model.path
    if builtin and not reward_configured(config.reward):
        config.reward.kind = config.task.get("name", "builtin")  # the task's data: its own oracle, said so
        say(f"reward: the {config.reward.kind} task's oracle (reward.kind={config.reward.kind!r})")
    if builtin:
        paths = prepare_task(config, workdir)
        config.model.path, config.data.train_path, config.data.eval_path = paths["model"], paths["train"], paths["eval"]
    mesh = make_mesh(dict(config.mesh))
    say(f"loading the data and the policy ({config.model.path})")
    tokenizer = Tokenizer.from_pretrained(config.model.tokenizer_path or config.model.path)
    d = config.data
    evaluated = has_eval_set(d)
    if not evaluated:
        say("evaluation: none (data.eval_path is empty): the run logs its training metrics only")
    encoded, records = {}, {}
    for split in ("train", "eval") if evaluated else ("train",):
        kind = d.get(f"{split}_kind", "preference")
        records[split] = load_records(d, split, kind)
        encoded[split] = encode_online(records[split], tokenizer, max_prompt_length=d.max_prompt_length,
                                       max_response_length=d.max_response_length, on_error=d.get("on_error", "raise"),
                                       prompts_only=kind == "prompt")
    model = load_pretrained(config.model.path, **model_options(config.model), shardings=sharding_fn(mesh))
    reward_source = make_reward_source(config.reward)
    eval_reward_source = make_eval_reward_source(config.reward)
    if evaluated and reward_source is None and eval_reward_source is None:
        say("evaluation: no reward configured (config.reward.kind is empty): reporting KL(π‖π_ref), response "
            "length, distinct-2 and held-out pair margins, not reward or win rate")
    evaluator_args = None if not evaluated else {
        "prompts": [records["eval"].rows[i]["prompt"] for i in encoded["eval"].arrays["index"]],
        "eval_arrays": encoded["eval"].arrays, "batch_size": config.eval_batch_size, "buckets": Buckets.from_config(d)}
    loop = OnlineLoop(
        config, model=model, tokenizer=tokenizer, mesh=mesh, workdir=workdir,
        train_arrays=encoded["train"].arrays,
        train_prompts=[r["prompt"] for r in records["train"].rows], reward_source=reward_source,
        eval_reward_source=eval_reward_source, evaluator_args=evaluator_args)
    initial, final = loop.run({f"skipped/{k}": float(v.skipped) for k, v in encoded.items()})
    summary = {"variant": config.get("variant", ""), "steps": config.steps,
               "reference": {k: initial[k] for k in ("reward", "score", "finished", "win_rate", "kl", "distinct_2")
                             if k in initial},
               "final": {k: final[k] for k in ("reward", "score", "finished", "win_rate", "kl", "distinct_2",
                                               "heldout/rewards/accuracies") if k in final},
               "train_seconds": loop.seconds["steps"],
               "generation_share": loop.seconds["generation"] / max(loop.seconds["steps"], 1e-9)}
    if config.get("export", True):  # sweeps of many runs skip the full-model copies
        export_policy(config, loop.trainable, loop.state.params, workdir, tokenizer)  # collective
    if jax.process_index() == 0:
        scored_by = config.reward.get("eval_kind") or config.reward.kind
        text = (summary_text(summary, loop.evaluator.sample_table(), oracle=scored_by in TASK_NAMES) if evaluated
                else f"{summary['variant'] or 'policy'}: {config.steps} steps; no held-out set (data.eval_path is "
                     "empty), so nothing was evaluated: the training metrics are in metrics.jsonl")
        write_summary(workdir, summary, text)
        if evaluated:
            _plot(workdir)
        print("\n" + text)
    return summary


def summary_text(summary, samples, *, oracle: bool) -> str:
    """The block the main job prints (and README quotes): reference vs final policy, then samples."""
    name = summary["variant"] or "policy"
    rows = [("SFT / reference", summary["reference"]), (f"{name} (final)", summary["final"])]
    lines = [f"{'':<24} {'reward':>7} {'win rate vs SFT':>16} {'KL(π‖π_ref)':>12} {'distinct-2':>11}"]
    for label, m in rows:
        reward, win = (f"{m[k]:.3f}" if k in m else "-" for k in ("reward", "win_rate"))
        lines.append(f"{label:<24} {reward:>7} {win:>16} {m['kl']:>12.3f} {m['distinct_2']:>11.3f}")
    if "reward" not in summary["final"]:
        lines.append("(no reward configured, so no reward or win rate: set config.reward.kind to measure them)")
    lines += ["", "samples (reference → policy" + ("" if "reward" not in summary["final"] else
                                                 ", with " + ("oracle" if oracle else "reward") + " scores") + "):"]
    score = lambda r: "" if r is None else f" ({r:+.2f})"  # noqa: E731
    for prompt, ref, r_ref, pol, r_pol in samples:
        lines.append(f"  {prompt!s:<32} {ref!r}{score(r_ref)} → {pol!r}{score(r_pol)}")
    return "\n".join(lines)


def _plot(workdir: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = sorted({r["step"]: r for r in rows if r["split"] == "eval"}.values(), key=lambda r: r["step"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [r["step"] for r in evals]
    y = "reward" if "reward" in evals[-1] else "distinct_2"  # no reward configured: the text's health
    axes[0].plot(steps, [r[y] for r in evals], marker="o")
    axes[0].set(xlabel="step", ylabel=f"{y} (held-out prompts)")
    axes[1].plot([r["kl"] for r in evals], [r[y] for r in evals], marker="o")
    axes[1].set(xlabel="KL(π‖π_ref)", ylabel=y)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "curves.png"), dpi=100)
    plt.close(fig)
