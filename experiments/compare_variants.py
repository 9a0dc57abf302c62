"""Compare offline DPO, online DPO, iterative DPO and the SAIL variants on the built-in task.

    python experiments/compare_variants.py --out=runs/compare            # 3 seeds x 8 variants
    python experiments/compare_variants.py --out=runs/compare --quick    # 2 seeds, fewer steps

Every run starts from the same SFT model and offline preference set (built once in OUT/task) and
takes the same number of updates with the same batch size. Writes OUT/results.md, OUT/results.csv
(mean ± 95% CI over seeds) and OUT/compare.png (reward vs KL, reward vs steps).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

import numpy as np

from sail_jax.configs import VARIANTS, sail_config
from sail_jax.recipes.sail import run as run_sail

# Student-t 97.5% quantiles for n - 1 degrees of freedom.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
METRICS = (("reward", "oracle reward"), ("win_rate", "win rate vs SFT"), ("kl", "KL(π‖π_SFT)"),
           ("heldout/rewards/accuracies", "held-out pair acc."), ("wall_seconds", "wall s"),
           ("generation_share", "generation share"))


def mean_ci(values):
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), _T975[len(values) - 1] * float(values.std(ddof=1)) / np.sqrt(len(values))


def run_one(variant: str, seed: int, out: str, steps: int, eval_every: int) -> dict:
    workdir = os.path.join(out, variant, f"seed{seed}")
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.exists(summary_path):  # finished earlier: resumable experiment
        with open(summary_path) as f:
            return json.load(f)
    config = sail_config(variant)
    config.seed, config.steps, config.eval_every = seed, steps, eval_every
    config.checkpoint.every = 0
    config.task.dir = os.path.join(out, "task")
    t0 = time.time()
    summary = run_sail(config, workdir)
    summary["wall_seconds"] = time.time() - t0
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--quick", action="store_true", help="2 seeds and 60 updates per run")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    seeds = args.seeds or (2 if args.quick else 3)
    steps = args.steps or (60 if args.quick else 150)
    variants = args.variants.split(",")
    os.makedirs(args.out, exist_ok=True)
    results = {v: [run_one(v, s, args.out, steps, steps // 3) for s in range(seeds)] for v in variants}

    rows = []
    for v, runs in results.items():
        row = {"variant": v}
        for key, _ in METRICS:
            vals = [r["final"][key] if key in r["final"] else r[key] for r in runs]
            row[key], row[key + "_ci"] = mean_ci(vals)
        rows.append(row)
    reference = np.mean([r["reference"]["reward"] for runs in results.values() for r in runs])
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"{seeds} seeds x {steps} updates (batch 32) per variant; SFT reference reward {reference:.3f}; "
             "mean ± 95% CI (Student t).", "",
             "| variant | " + " | ".join(label for _, label in METRICS) + " |",
             "|---" * (len(METRICS) + 1) + "|"]
    for row in rows:
        cells = [f"{row[k]:.3f} ± {row[k + '_ci']:.3f}" if k != "wall_seconds" else f"{row[k]:.0f} ± {row[k + '_ci']:.0f}"
                 for k, _ in METRICS]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    _plot(results, args.out)


def _plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v, runs in results.items():
        kl = [r["final"]["kl"] for r in runs]
        reward = [r["final"]["reward"] for r in runs]
        axes[0].scatter(kl, reward, label=v)
        curves = []
        for seed in range(len(runs)):
            path = os.path.join(out, v, f"seed{seed}", "metrics.jsonl")
            evals = {}
            for line in open(path):
                rec = json.loads(line)
                if rec["split"] == "eval":
                    evals[rec["step"]] = rec["reward"]
            curves.append([evals[s] for s in sorted(evals)])
            steps = sorted(evals)
        axes[1].plot(steps, np.mean(curves, axis=0), marker="o", label=v)
    axes[0].set(xlabel="KL(π‖π_SFT) (final)", ylabel="oracle reward (final)", title="reward vs KL (each seed)")
    axes[1].set(xlabel="updates", ylabel="oracle reward (mean over seeds)", title="reward vs steps")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
