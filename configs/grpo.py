"""The online loop, variant `grpo`: GRPO (Shao et al., DeepSeekMath, 2024) — 4 samples per prompt, each
scored by the reward source, advantages normalised within the prompt's group, the clipped surrogate
with each sequence's token mean (pg.loss_type=grpo) and β·KL(π‖π_ref) (k3, pg.beta 0.04). TRL's
GRPOTrainer defaults (DAPO's token-level mean, β 0) are `--config.pg.loss_type=dapo --config.pg.beta=0`.

    sail-jax --config=configs/grpo.py --workdir=runs/grpo

With no model.path this runs the built-in task end to end on CPU.
"""

from sail_jax.configs import sail_config


def get_config():
    return sail_config("grpo")
