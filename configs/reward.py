"""Reward model: Bradley–Terry on ``{prompt, chosen, rejected}`` pairs with a scalar head.

A causal-LM checkpoint gets a new reward head; the export is an HF ``*ForSequenceClassification``.

    sail-jax --config=configs/reward.py --workdir=runs/rm \
        --config.model.path=/path/to/hf_model --config.data.train_path=pairs.jsonl
"""

from sail_jax.configs import base_config


def get_config():
    config = base_config("reward")
    config.optim.learning_rate = 1e-5
    return config
