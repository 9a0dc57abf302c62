"""Supervised fine-tuning: NLL on the response tokens of ``{prompt, response}`` (or preference) rows.

    sail-jax --config=configs/sft.py --workdir=runs/sft \
        --config.model.path=/path/to/hf_model --config.data.train_path=train.jsonl
"""

from sail_jax.configs import base_config


def get_config():
    config = base_config("sft")
    config.optim.learning_rate = 2e-5
    return config
