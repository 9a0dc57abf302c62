"""SAIL on Qwen2.5-1.5B-Instruct, planned for v4-8 / v5e-8 / 1xH100 (single host); see sail_jax.configs.preset_config.

    huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct --local-dir models/Qwen2.5-1.5B-Instruct
    sail-jax plan --config=configs/qwen2_5_1_5b_sail.py                     # per-device memory on each target
    sail-jax --config=configs/qwen2_5_1_5b_sail.py:ultrafeedback,sail_pp --workdir=runs/qwen2_5_1_5b \\
        --config.reward.path=models/REWARD_MODEL --config.checkpoint.dir=gs://BUCKET/qwen2_5_1_5b

After ':' the dataset (ultrafeedback | pku_saferlhf | hh_rlhf, built with sail_jax.data.tfds_builders
into config.data.tfds_dir) and optionally a variant of sail_jax.configs.VARIANTS. reward.path is the
reward model (an HF *ForSequenceClassification folder, e.g. trained with configs/reward.py): the
evaluation scores with it, and SAIL-PR labels with it.
"""

from sail_jax.configs import preset_config


def get_config(arg: str = "ultrafeedback"):
    dataset, _, variant = arg.partition(",")
    return preset_config("qwen2_5_1_5b", dataset or "ultrafeedback", variant or "sail_pp")
