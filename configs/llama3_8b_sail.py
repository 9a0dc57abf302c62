"""SAIL on Meta-Llama-3-8B-Instruct, planned for v4-32 / v5e-32 (multi-host); see sail_jax.configs.preset_config.

    # the model is read by its Hub id meta-llama/Meta-Llama-3-8B-Instruct (into the Hugging Face cache on first use)
    sail-jax plan --config=configs/llama3_8b_sail.py                     # per-device memory on each target
    sail-jax --config=configs/llama3_8b_sail.py:ultrafeedback,sail_pp --workdir=runs/llama3_8b \\
        --config.reward.path=models/REWARD_MODEL --config.checkpoint.dir=gs://BUCKET/llama3_8b

After ':' the dataset and optionally the variant: see sail_jax.configs.preset_config.
"""

from sail_jax.configs import preset_config


def get_config(arg: str = ""):
    return preset_config("llama3_8b", arg)
