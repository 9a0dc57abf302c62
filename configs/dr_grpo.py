"""The online loop, variant `dr_grpo`: Dr. GRPO (Liu et al., "Understanding R1-Zero-Like Training", 2025) —
GRPO without its two length and difficulty biases: advantages are not divided by the group's std
(pg.scale_rewards=none) and token losses are summed over a constant (samples x max new tokens,
pg.loss_type=dr_grpo); no KL term (pg.beta 0). 4 samples per prompt.

    sail-jax --config=configs/dr_grpo.py --workdir=runs/dr_grpo

With no model.path this runs the built-in task end to end on CPU.
"""

from sail_jax.configs import sail_config


def get_config():
    return sail_config("dr_grpo")
