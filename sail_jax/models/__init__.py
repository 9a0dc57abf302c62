"""Our own flax.nnx models for the Llama / Qwen2 / Mistral family, and HF checkpoint I/O."""

from sail_jax.models.config import ARCHITECTURES, ModelConfig
from sail_jax.models.hf import load_pretrained, read_config, save_pretrained
from sail_jax.models.transformer import CausalLM, KVCache, RewardModel, build_model, init_cache

__all__ = [
    "ARCHITECTURES",
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "RewardModel",
    "build_model",
    "init_cache",
    "load_pretrained",
    "read_config",
    "save_pretrained",
]
