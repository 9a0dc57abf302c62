"""Shared test setup: 8 fake CPU devices (before jax initialises) and tiny HF checkpoints built offline."""

import os

import jax

# Must run before any backend is initialised so that mesh tests see 8 devices. Unsharded
# computations still run on device 0 alone, so this costs the rest of the suite nothing.
jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of a minute or more (still run in CI)")


TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)


def random_hf_model(cls_name: str, seed: int = 0, **overrides):
    """A tiny random transformers model with weights large enough that mistakes show in the logits."""
    import torch
    import transformers

    model_type = {"Llama": "LlamaConfig", "Qwen2": "Qwen2Config", "Mistral": "MistralConfig"}
    prefix = next(p for p in model_type if cls_name.startswith(p))
    config = getattr(transformers, model_type[prefix])(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture
def save_hf(tmp_path):
    """Save a transformers model to a fresh folder and return the path."""

    def save(model, name="model"):
        path = str(tmp_path / name)
        model.save_pretrained(path)
        return path

    return save


def left_padded_batch(vocab: int, batch: int, length: int, seed: int = 0, pad_id: int | None = None):
    """Random ids with rows left-padded by different amounts (row 0 unpadded); pad slots get pad_id."""
    rng = np.random.RandomState(seed)
    low = 0 if pad_id is None else pad_id + 1
    ids = rng.randint(low, vocab, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for i in range(1, batch):
        mask[i, : min(2 * i + 1, length - 1)] = 0
    if pad_id is not None:
        ids[mask == 0] = pad_id
    return ids, mask


def torch_logits(model, ids, mask):
    """transformers' forward with positions derived from the mask, as our models derive them."""
    import torch

    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = model(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                    position_ids=torch.tensor(positions).long())
    return out.logits.float().numpy()


GOOD = "red green blue apple pear happy bright warm".split()
BAD = "stone river cloud quiet fast slow dark cold".split()


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Preference rows with a learnable rule: the chosen word is from GOOD, the rejected from BAD."""
    rng = np.random.RandomState(seed)
    return [{"prompt": "Say a word after " + " ".join(rng.choice(GOOD + BAD, size=3)) + ":",
             "chosen": f" {rng.choice(GOOD)}.", "rejected": f" {rng.choice(BAD)}."} for _ in range(n)]


def dpo_command(workdir, model, train, evalp, *extra) -> list[str]:
    """The CLI on an offline DPO run of the tiny checkpoint (run from the repository root)."""
    import sys

    return [sys.executable, "-m", "sail_jax.cli", "--config=configs/dpo.py", f"--workdir={workdir}",
            f"--config.model.path={model}", f"--config.data.train_path={train}",
            f"--config.data.eval_path={evalp}", "--config.data.max_prompt_length=40", "--config.data.max_length=48",
            "--config.batch_size=8", "--config.eval_batch_size=16", "--config.optim.learning_rate=3e-3",
            *extra]


def write_jsonl(path, rows) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Qwen2-architecture model + BPE tokenizer (built by us, no torch) as an HF folder."""
    from sail_jax.models import ModelConfig, build_model, save_pretrained
    from sail_jax.tokenization import train_bpe_tokenizer

    path = str(tmp_path_factory.mktemp("tiny") / "model")
    texts = [" ".join(r.values()) for r in synthetic_pairs(200)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=128)
    config = ModelConfig(model_type="qwen2", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    save_pretrained(build_model(config, seed=0), path, tokenizer=tokenizer)
    return path


def main_job_variant() -> str:
    """The variant README's main job (configs/sail_pp.py) runs."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("main_job_config", os.path.join(root, "configs", "sail_pp.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().variant
