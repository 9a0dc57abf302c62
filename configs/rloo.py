"""The online loop, variant `rloo`: REINFORCE Leave-One-Out (Ahmadian et al., 2024) as TRL's RLOOTrainer
computes it — 4 samples per prompt, each reward less β·Σ_t log(π_old/π_ref) of its sample (pg.beta
0.05), minus the mean of its 3 siblings' as the baseline; the clipped sequence-level surrogate.

    sail-jax --config=configs/rloo.py --workdir=runs/rloo

With no model.path this runs the built-in task end to end on CPU.
"""

from sail_jax.configs import sail_config


def get_config():
    return sail_config("rloo")
