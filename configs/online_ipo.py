"""The online loop, variant `online_ipo` (see sail_jax.configs.VARIANTS and ../shared/SAIL.md): online
IPO (Calandriello et al., "Human Alignment of Large Language Models through Online Preference
Optimisation", 2024) — every prompt sampled fresh, labelled by the reward source, IPO's squared loss.

    sail-jax --config=configs/online_ipo.py --workdir=runs/online_ipo

With no model.path this runs the built-in task end to end on CPU.
"""

from sail_jax.configs import sail_config


def get_config():
    return sail_config("online_ipo")
