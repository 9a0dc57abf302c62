"""Compare offline DPO, online DPO, iterative DPO and the SAIL variants on the built-in task.

    python experiments/compare_variants.py --out=runs/compare            # 3 seeds x 8 variants
    python experiments/compare_variants.py --out=runs/compare --quick    # 2 seeds, fewer steps

Every run starts from the same SFT model and offline preference set (built once in OUT/task) and
takes the same number of updates with the same batch size. Writes OUT/results.md, OUT/results.csv
(mean ± 95% CI over seeds) and OUT/compare.png (reward vs KL, reward vs steps). Resumable.
"""

from __future__ import annotations

import argparse

import numpy as np

from sail_jax.configs import VARIANTS, sail_config
from sail_jax.sweep import summarise, sweep

METRICS = (("reward", "oracle reward"), ("win_rate", "win rate vs SFT"), ("kl", "KL(π‖π_SFT)"),
           ("heldout/rewards/accuracies", "held-out pair acc."), ("wall_seconds", "wall s"),
           ("generation_share", "generation share"))


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
    def make_config(variant):
        c = sail_config(variant)
        c.checkpoint.every = 0  # 20-second runs: rerun rather than checkpoint
        return c

    results = sweep(make_config, args.variants.split(","), seeds, args.out, steps=steps, eval_every=steps // 3)
    reference = np.mean([r["reference"]["reward"] for runs in results.values() for r in runs])
    print(summarise(results, METRICS, args.out, f"{seeds} seeds x {steps} updates (batch 32) per variant; "
                                                f"SFT reference reward {reference:.3f}."))


if __name__ == "__main__":
    main()
