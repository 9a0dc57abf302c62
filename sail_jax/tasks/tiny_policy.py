"""The starting policy of the tiny built-in tasks: a BPE tokenizer trained on the task's words, a tiny
random Qwen2-architecture model, and SFT on the task's demonstrations (the offline SFT recipe)."""

from __future__ import annotations

import os

from sail_jax.models import ModelConfig, build_model, save_pretrained
from sail_jax.progress import say
from sail_jax.tokenization import train_bpe_tokenizer

MODEL_DIR = os.path.join("sft", "export")
VOCAB_SIZE = 600  # the BPE tokenizer's target size (the trained one may come out smaller)


def model_config(vocab_size: int = VOCAB_SIZE, *, eos_id=None, pad_id=None) -> ModelConfig:
    """2 layers, d = 64: trains and samples in seconds on a laptop CPU."""
    return ModelConfig(model_type="qwen2", vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=True,
                       eos_token_id=eos_id, pad_token_id=pad_id)


def build_sft_policy(config, root: str, *, corpus: list[str], sft_records: list[dict], name: str) -> str:
    """``root/sft/export`` (built once): tokenizer + random model in ``root/base``, then ``task.sft_steps``
    of SFT on ``sft_records`` (``{prompt, response}``)."""
    from sail_jax.configs import base_config
    from sail_jax.recipes.offline import run as run_offline
    from sail_jax.tasks.prepare import write_jsonl

    base, sft = os.path.join(root, "base"), os.path.join(root, "sft")
    path = os.path.join(root, MODEL_DIR)
    if not os.path.exists(os.path.join(path, "config.json")):
        os.makedirs(base, exist_ok=True)
        tokenizer = train_bpe_tokenizer(corpus, vocab_size=VOCAB_SIZE)
        save_pretrained(build_model(model_config(tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                                                 pad_id=tokenizer.pad_id), seed=config.seed), base, tokenizer=tokenizer)
        sft_cfg = base_config("sft")
        sft_cfg.model.path = base
        sft_cfg.data.train_path = write_jsonl(os.path.join(root, "sft_train.jsonl"), sft_records)
        sft_cfg.data.max_prompt_length = config.data.max_prompt_length
        sft_cfg.data.max_length = config.data.max_prompt_length + config.data.max_response_length
        sft_cfg.mesh = config.mesh
        sft_cfg.batch_size, sft_cfg.steps, sft_cfg.log_every = 32, config.task.sft_steps, 50
        sft_cfg.optim.learning_rate, sft_cfg.optim.warmup_steps = 3e-3, 20
        sft_cfg.checkpoint.every = 0
        say(f"task: SFT warm start of a new tiny policy ({config.task.sft_steps} steps) in {sft}")
        run_offline(sft_cfg, sft)
    return path
