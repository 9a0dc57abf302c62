"""The online loop, variant `spin` (see sail_jax.configs.VARIANTS and ../shared/SAIL.md): SPIN (Chen et
al., "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models", 2024) — the
dataset's chosen response against the policy's own sample, the dataset's always preferred, with
DPO's logistic loss; iterations of 10 updates sample from one policy snapshot, which then becomes
the next iteration's reference (reference.sync_every = generation.interval = 10).

    sail-jax --config=configs/spin.py --workdir=runs/spin

With no model.path this runs the built-in task end to end on CPU.
"""

from sail_jax.configs import sail_config


def get_config():
    return sail_config("spin")
