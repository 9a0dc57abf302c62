"""The main job: the self-labelled route, SAIL-PP with SAIL-RevKL (variant `sail_pp_revkl`, see
sail_jax.configs.VARIANTS and ../shared/SAIL.md). The paper's plain SAIL-PP is configs/sail_pp_plain.py.

    sail-jax --config=configs/sail_pp.py --workdir=runs/sail

With no model.path this runs the built-in task end to end on CPU.
"""

from sail_jax.configs import sail_config


def get_config():
    config = sail_config("sail_pp_revkl")
    config.sail.log_term_grads = True  # each term's gradient norm at log steps: cheap at the task's size
    return config
