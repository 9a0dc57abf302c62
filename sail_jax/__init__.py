"""sail-jax: online, self-improving alignment (SAIL) of language models in JAX/Flax.

From Python (a notebook)::

    import sail_jax
    from sail_jax.configs import sail_config

    config = sail_config("sail_pr")
    config.model.path = "Qwen/Qwen2.5-0.5B-Instruct"  # a Hub id, a local folder or gs://bucket/path
    config.data.update(source="hf", hf_name="trl-lib/ultrafeedback_binarized", eval_split="test")
    summary = sail_jax.run(config, "runs/mine", reward=lambda prompts, responses: [len(r) / 100 for r in responses])
"""

import os

# transformers is used here for tokenizers and configs only; its "PyTorch was not found" advice is noise.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"


def run(config, workdir: str, *, reward=None, allow_config_change: bool = False):
    """Run ``config``'s recipe in ``workdir``, as ``sail-jax --config=... --workdir=...`` does; see
    ``sail_jax.launch.launch``. ``reward``: a Python function ``(prompts, responses) -> one float per
    response`` scoring the online loop's samples (as TRL's ``reward_funcs``)."""
    from sail_jax.launch import launch

    return launch(config, workdir, reward=reward, allow_config_change=allow_config_change)
