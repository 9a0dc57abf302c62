"""The paper's plain SAIL-PP (variant `sail_pp`: p_pp 0.3, λ 0.2, no RevKL). It drifts from the reference
on the built-in task in most seeds (docs/online.md, "Why SAIL-PP drifted"); the main job, configs/sail_pp.py,
adds SAIL-RevKL.

    sail-jax --config=configs/sail_pp_plain.py --workdir=runs/sail_pp_plain
"""

from sail_jax.configs import sail_config


def get_config():
    return sail_config("sail_pp")
