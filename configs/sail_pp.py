"""The online loop, variant `sail_pp` (see sail_jax.configs.VARIANTS and ../shared/SAIL.md).

    sail-jax --config=configs/sail_pp.py --workdir=runs/sail_pp

With no model.path this runs the built-in task end to end on CPU.
"""

from sail_jax.configs import sail_config


def get_config():
    return sail_config("sail_pp")
