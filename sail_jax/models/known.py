"""The ``config.json`` of the public models our presets name, so the memory planner can size a run
before anything is downloaded (``config.model.hub_id``). A downloaded folder (``config.model.path``)
always wins over this table."""

from __future__ import annotations

from sail_jax.models.config import ModelConfig

_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
          "max_position_embeddings": 32768, "use_sliding_window": False, "bos_token_id": 151643,
          "eos_token_id": 151645}

KNOWN_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B-Instruct": {**_QWEN2, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                                   "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                                   "tie_word_embeddings": True},
    "Qwen/Qwen2.5-1.5B-Instruct": {**_QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                                   "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                                   "tie_word_embeddings": True},
    "Qwen/Qwen2.5-7B-Instruct": {**_QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                 "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                                 "tie_word_embeddings": False},
    "meta-llama/Meta-Llama-3-8B-Instruct": {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": [128001, 128009]},
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True, "bos_token_id": 1,
        "eos_token_id": 2},
}


def known_config(hub_id: str, **overrides) -> ModelConfig:
    if hub_id not in KNOWN_CONFIGS:
        raise ValueError(f"config.model.hub_id={hub_id!r} is not in sail_jax.models.known; known: "
                         f"{sorted(KNOWN_CONFIGS)} (or download the model and set config.model.path)")
    return ModelConfig.from_hf_dict(KNOWN_CONFIGS[hub_id], source=f"known config of {hub_id}", **overrides)
