"""SAIL on Meta-Llama-3-8B-Instruct, planned for v4-32 / v5e-32 (multi-host); see sail_jax.configs.preset_config.

    huggingface-cli download meta-llama/Meta-Llama-3-8B-Instruct --local-dir models/Meta-Llama-3-8B-Instruct
    sail-jax plan --config=configs/llama3_8b_sail.py                     # per-device memory on each target
    sail-jax --config=configs/llama3_8b_sail.py:ultrafeedback,sail_pp --workdir=runs/llama3_8b \\
        --config.reward.path=models/REWARD_MODEL --config.checkpoint.dir=gs://BUCKET/llama3_8b

After ':' the dataset (ultrafeedback | pku_saferlhf | hh_rlhf, built with sail_jax.data.tfds_builders
into config.data.tfds_dir) and optionally a variant of sail_jax.configs.VARIANTS. reward.path is the
reward model (an HF *ForSequenceClassification folder, e.g. trained with configs/reward.py): the
evaluation scores with it, and SAIL-PR labels with it.
"""

from sail_jax.configs import preset_config


def get_config(arg: str = "ultrafeedback"):
    dataset, _, variant = arg.partition(",")
    return preset_config("llama3_8b", dataset or "ultrafeedback", variant or "sail_pp")
