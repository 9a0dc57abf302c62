"""Variants x seeds of the online loop, run resumably and summarised as a table, a CSV and a plot, and
paired comparisons of two arms over the same seeds.

Shared by the experiments in ``experiments/``: every run of a sweep starts from the same task files
(built once in ``OUT/task``) and takes the same number of updates with the same batch size; seed s of
every arm draws the same prompts, so arms can be compared seed by seed.
"""

from __future__ import annotations

import concurrent.futures
import copy
import csv
import hashlib
import json
import multiprocessing
import os
import subprocess
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from scipy import stats

from sail_jax import compile_cache
from sail_jax.data import buckets


def mean_ci(values):
    """Mean and the half-width of its 95% confidence interval (Student t; nan for one value)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))


# Config fields that name files on the machine that ran: they differ between machines, not between runs.
MACHINE_LOCAL_KEYS = ("task.dir", "task.gguf", "model.path", "reward.path", "compilation_cache")


def run_config(make_config: Callable, variant: str, seed: int, **overrides):
    config = make_config(variant)
    config.seed = seed
    config.update(overrides)
    return config


# Settings added after ledgers were written, with the value that asks for what runs before them did:
# at that value they are left out of the fingerprint, so a new knob does not orphan finished runs.
ADDED_SETTINGS = {"data.train_kind": "preference", "data.shuffle": True, "data.group_by_length": False,
                  "data.group_window": 64, "data.packing": False, "generation.slots": 0, "data.hf_name": "",
                  "data.hf_subset": "", "data.hf_columns": ""}
# Settings removed since (the online loop never read them), with the value ledgers recorded: a config
# without one counts at that value.
REMOVED_SETTINGS = {"data.max_length": 128}


def config_fingerprint(config) -> str:
    """A hash of everything a run's config sets except MACHINE_LOCAL_KEYS, the length buckets' keys (and
    ADDED_SETTINGS at their old behaviour; REMOVED_SETTINGS at the value they had): two runs with the same fingerprint were asked for the same
    thing (the code they ran is recorded beside it). Keys the run fills in (``configs.fill_defaults``)
    count at the values it will use."""
    from sail_jax.configs import fill_defaults, pg_defaults

    config = copy.deepcopy(config)
    fill_defaults(config)
    values = json.loads(config.to_json())

    def parent(key):  # the dict holding a dotted key's last part, and that part
        *sections, name = key.split(".")
        node = values
        for section in sections:
            node = node.get(section, {})
        return node, name

    for key in MACHINE_LOCAL_KEYS + buckets.CONFIG_KEYS:
        node, name = parent(key)
        node.pop(name, None)
    for key, old in ADDED_SETTINGS.items():
        node, name = parent(key)
        if node.get(name) == old:
            node.pop(name)
    if values.get("pg") == json.loads(ml_collections.ConfigDict(pg_defaults()).to_json()):  # added unused
        values.pop("pg")
    for key, old in REMOVED_SETTINGS.items():
        node, name = parent(key)
        node.setdefault(name, old)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _provenance() -> dict:
    """Which code and hardware made a run: the git commit (``+dirty`` with uncommitted changes; on a
    copy of the tree without git, ``$SAIL_JAX_COMMIT`` if set), the device kind and jax's version."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("SAIL_JAX_COMMIT", "unknown")
    return {"commit": commit, "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def run_one(make_config: Callable, variant: str, seed: int, out: str, **overrides) -> dict:
    """One run in ``OUT/<variant>/seed<seed>``; a finished run (summary.json) is read, not rerun, and
    an interrupted one resumes from its last checkpoint (if its config writes checkpoints)."""
    from sail_jax.recipes.sail import run as run_sail

    workdir = os.path.join(out, variant, f"seed{seed}")
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            return json.load(f)
    config = run_config(make_config, variant, seed, **overrides)
    made_by = {"config_fingerprint": config_fingerprint(config), **_provenance()}  # the code as the run starts
    config.task.dir = os.path.join(out, "task")
    t0 = time.time()
    summary = run_sail(config, workdir)
    summary.update(wall_seconds=time.time() - t0, **made_by)
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def use_compile_cache(out: str) -> str:
    """JAX's persistent compilation cache in ``OUT/jax_cache`` (or ``$JAX_COMPILATION_CACHE_DIR``), for
    this process and the worker processes it starts: every run of a sweep compiles the same programs,
    so only the first pays for them (a built-in task run: 23 s -> 18 s on the 2-core CPU, results
    bit-identical). Returns the folder."""
    path = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(out), "jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    return compile_cache.enable(path)


def prepare_shared_task(make_config: Callable, variant: str, out: str) -> None:
    """Build ``OUT/task`` (the task's policy, offline pairs and held-out set) once, before any run."""
    from sail_jax.tasks.prepare import prepare_task

    config = make_config(variant)
    config.task.dir = os.path.join(out, "task")
    if not config.model.path:  # a run on an existing model folder needs no task files
        prepare_task(config, out)


def sweep(make_config: Callable, variants, seeds: int, out: str, *, jobs: int = 1, phases=None,
          stop_after: float | None = None, **overrides) -> dict[str, list[dict]]:
    """Every variant at seeds 0..seeds-1, seed by seed (an interrupted sweep leaves whole seeds of
    every variant: see ``finished_runs``); ``phases`` (lists of the variants) runs each phase's seeds
    before the next phase's, e.g. the contrasts that matter most first. ``jobs`` > 1 runs that many
    at once in fresh processes (``make_config`` must then be picklable: a module-level function or a
    partial of one), after one of them has built the shared task files. Compiled programs are shared
    through ``use_compile_cache``. ``stop_after`` (seconds; a GPU session's budget): no run starts
    later, those running finish, and the result holds what finished. Summaries carry their ``seed``,
    as ``finished_runs`` returns them."""
    os.makedirs(out, exist_ok=True)
    use_compile_cache(out)
    phases = phases or [list(variants)]
    if sorted(v for phase in phases for v in phase) != sorted(variants):
        raise ValueError(f"phases {phases} must hold each of the variants {list(variants)} once")
    runs = [(v, s) for phase in phases for s in range(seeds) for v in phase]
    deadline = time.time() + stop_after if stop_after is not None else float("inf")
    done = {}
    if jobs <= 1 or len(runs) <= 1:
        for r in runs:
            if time.time() >= deadline:
                break
            done[r] = run_one(make_config, *r, out, **overrides)
    else:
        context = multiprocessing.get_context("spawn")  # jax does not survive fork
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            pool.submit(prepare_shared_task, make_config, variants[0], out).result()
            pending, running = list(runs), {}
            while pending or running:
                while pending and len(running) < jobs and time.time() < deadline:
                    r = pending.pop(0)
                    running[pool.submit(run_one, make_config, *r, out, **overrides)] = r
                if not running:
                    break
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    done[running.pop(future)] = future.result()
    if len(done) < len(runs):
        return finished_runs(variants, seeds, out)
    return {v: [{**done[(v, s)], "seed": s} for s in range(seeds)] for v in variants}


def finished_runs(variants, seeds: int, out: str) -> dict[str, list[dict]]:
    """What a sweep into ``out`` has finished so far, without running anything: each variant's summaries
    of seeds 0..seeds-1 that exist, in seed order (``summary["seed"]`` says which)."""
    results = {}
    for v in variants:
        runs = []
        for seed in range(seeds):
            path = os.path.join(out, v, f"seed{seed}", "summary.json")
            if os.path.exists(path):
                with open(path) as f:
                    runs.append({**json.load(f), "seed": seed})
        results[v] = runs
    return results


def save_ledger(variants, seeds: int, out: str, path: str) -> int:
    """Add the summaries of the runs finished in ``out`` to the JSON file ``path``, a ledger keyed
    ``<variant>/seed<k>/<config fingerprint>`` (so runs of other settings, e.g. another ``--steps``,
    sit beside each other), so a sweep too long for one machine session can go on in the next one:
    ``load_ledger`` puts them back. Returns how many runs it holds."""
    ledger = {}
    if os.path.exists(path):
        with open(path) as f:
            ledger = json.load(f)
    for v, runs in finished_runs(variants, seeds, out).items():
        ledger.update({f"{v}/seed{r['seed']}/{r.get('config_fingerprint', 'unrecorded')}": r for r in runs})
    with open(path, "w") as f:
        json.dump(ledger, f, indent=1, sort_keys=True)
    return len(ledger)


def load_ledger(path: str, make_config: Callable, out: str, **overrides) -> tuple[int, list[str]]:
    """Put the runs of a ledger (``save_ledger``) into ``out`` as finished runs, so ``sweep`` skips them.
    A run is taken only if its config fingerprint equals what ``make_config`` asks for today; returned
    beside the count: the runs of the ledger with no such entry (stale: a setting changed since), which
    the sweep will run again. Runs already in ``out`` stay."""
    if not os.path.exists(path):
        return 0, []
    with open(path) as f:
        ledger = json.load(f)
    by_run = {}
    for key, summary in ledger.items():
        variant, seed, fingerprint = key.rsplit("/", 2)
        by_run.setdefault((variant, int(seed.removeprefix("seed"))), {})[fingerprint] = summary
    taken, stale = 0, []
    for (variant, seed), summaries in sorted(by_run.items()):
        try:
            summary = summaries.get(config_fingerprint(run_config(make_config, variant, seed, **overrides)))
        except (KeyError, ValueError):  # a variant make_config no longer knows
            summary = None
        target = os.path.join(out, variant, f"seed{seed}", "summary.json")
        if summary is None:
            stale.append(f"{variant}/seed{seed}")
        elif not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w") as f:
                json.dump({k: v for k, v in summary.items() if k != "seed"}, f, indent=2)
            taken += 1
    return taken, stale


def final_value(run: dict, key: str) -> float:
    return run["final"][key] if key in run["final"] else run[key]


def paired_contrast(baseline: list[dict], treatment: list[dict], key: str, *, higher_is_better: bool = True) -> dict:
    """Treatment minus baseline on ``key``, seed by seed: mean difference, its 95% CI (Student t), the
    paired t-test's two-sided p-value, and a verdict: "helps" / "hurts" when the CI excludes 0, else
    "no detectable difference"."""
    diff = np.array([final_value(t, key) - final_value(b, key) for b, t in zip(baseline, treatment)])
    mean, half = mean_ci(diff)
    p = float(stats.ttest_1samp(diff, 0.0).pvalue) if len(diff) > 1 and diff.std() > 0 else float("nan")
    if np.isfinite(half) and abs(mean) > half:
        verdict = "helps" if (mean > 0) == higher_is_better else "hurts"
    else:
        verdict = "no detectable difference"
    return {"metric": key, "mean_diff": mean, "ci": half, "p_value": p, "verdict": verdict, "n": len(diff)}


def summarise(results: dict[str, list[dict]], metrics, out: str, header: str) -> str:
    """Mean ± 95% CI over seeds of each ``(key, label)`` metric (final evaluation, else summary)."""
    rows = []
    for v, runs in results.items():
        row = {"variant": v}
        for key, _ in metrics:
            row[key], row[key + "_ci"] = mean_ci([final_value(r, key) for r in runs])
        rows.append(row)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [header + " Mean ± 95% CI over seeds (Student t).", "",
             "| variant | " + " | ".join(label for _, label in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for row in rows:
        cells = [f"{row[k]:.0f} ± {row[k + '_ci']:.0f}" if k == "wall_seconds" else f"{row[k]:.3f} ± {row[k + '_ci']:.3f}"
                 for k, _ in metrics]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    _plot(results, out)
    return table


def _plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v, runs in results.items():
        axes[0].scatter([r["final"]["kl"] for r in runs], [r["final"]["reward"] for r in runs], label=v)
        curves = []
        for seed in range(len(runs)):
            evals = {}
            for line in open(os.path.join(out, v, f"seed{seed}", "metrics.jsonl")):
                rec = json.loads(line)
                if rec["split"] == "eval":
                    evals[rec["step"]] = rec["reward"]
            steps = sorted(evals)
            curves.append([evals[s] for s in steps])
        axes[1].plot(steps, np.mean(curves, axis=0), marker="o", label=v)
    axes[0].set(xlabel="KL(π‖π_ref) (final)", ylabel="oracle reward (final)", title="reward vs KL (each seed)")
    axes[1].set(xlabel="updates", ylabel="oracle reward (mean over seeds)", title="reward vs steps")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"), dpi=100)
    plt.close(fig)
