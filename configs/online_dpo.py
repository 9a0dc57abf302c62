"""The online loop, variant `online_dpo` (see sail_jax.configs.VARIANTS and ../shared/SAIL.md).

    sail-jax --config=configs/online_dpo.py --workdir=runs/online_dpo

With no model.path this runs the built-in task end to end on CPU.
"""

from sail_jax.configs import sail_config


def get_config():
    return sail_config("online_dpo")
