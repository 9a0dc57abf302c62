"""SAIL on Qwen2.5-1.5B-Instruct, planned for v4-8 / v5e-8 / 1xH100 (single host); see sail_jax.configs.preset_config.

    # the model is read by its Hub id Qwen/Qwen2.5-1.5B-Instruct (into the Hugging Face cache on first use)
    sail-jax plan --config=configs/qwen2_5_1_5b_sail.py                     # per-device memory on each target
    sail-jax --config=configs/qwen2_5_1_5b_sail.py:ultrafeedback,sail_pp --workdir=runs/qwen2_5_1_5b \\
        --config.reward.path=models/REWARD_MODEL --config.checkpoint.dir=gs://BUCKET/qwen2_5_1_5b

After ':' the dataset and optionally the variant: see sail_jax.configs.preset_config.
"""

from sail_jax.configs import preset_config


def get_config(arg: str = ""):
    return preset_config("qwen2_5_1_5b", arg)
