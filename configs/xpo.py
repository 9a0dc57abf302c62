"""The online loop, variant `xpo` (see sail_jax.configs.VARIANTS and ../shared/SAIL.md): XPO (Xie et al.,
"Exploratory Preference Optimization", 2024) as TRL's XPOTrainer defines it — per prompt one sample
from the policy and one from the reference, labelled by the reward source, DPO's loss plus
α·log π(y_ref) (sail.xpo_alpha; TRL's default 1e-5).

    sail-jax --config=configs/xpo.py --workdir=runs/xpo

With no model.path this runs the built-in task end to end on CPU.
"""

from sail_jax.configs import sail_config


def get_config():
    return sail_config("xpo")
