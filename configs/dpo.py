"""Offline DPO (or any ``loss.loss_type`` of sail_jax.losses) on a fixed preference set.

    sail-jax --config=configs/dpo.py --workdir=runs/dpo \
        --config.model.path=/path/to/sft_model --config.data.train_path=pairs.jsonl \
        --config.loss.loss_type=ipo --config.optim.name=rmsprop

From TFDS (see sail_jax/data/tfds_builders.py):
        --config.data.source=tfds --config.data.tfds_name=preference_pairs/hh_rlhf --config.data.tfds_dir=...
"""

from sail_jax.configs import base_config


def get_config():
    config = base_config("dpo")
    config.loss.beta = 0.1
    config.optim.learning_rate = 5e-6
    return config
