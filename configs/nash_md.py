"""The online loop, variant `nash_md` (see sail_jax.configs.VARIANTS and ../shared/SAIL.md): Nash-MD
(Munos et al., "Nash Learning from Human Feedback", 2023) as TRL's NashMDTrainer defines it — per
prompt one sample from the policy and one from the geometric mixture π^(1−m)·π_ref^m
(sail.mixture_coef, TRL's default 0.5), both scored by the reward source, and the loss
β·Σ_t sg(log π/π_ref)(y_t)·log π(y_t) − (P − ½)·log π(y) on the policy's sample y, P = σ(r(y) − r(y')).

    sail-jax --config=configs/nash_md.py --workdir=runs/nash_md

With no model.path this runs the built-in task end to end on CPU.
"""

from sail_jax.configs import sail_config


def get_config():
    return sail_config("nash_md")
