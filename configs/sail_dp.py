"""The online loop, variant `sail_dp` (see sail_jax.configs.VARIANTS and ../shared/SAIL.md).

    sail-jax --config=configs/sail_dp.py --workdir=runs/sail_dp

With no model.path this runs the built-in task end to end on CPU.
"""

from sail_jax.configs import sail_config


def get_config():
    return sail_config("sail_dp")
