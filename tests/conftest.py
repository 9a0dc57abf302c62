"""Shared test setup: 8 fake CPU devices (before jax initialises) and tiny HF checkpoints built offline."""

import hashlib
import os

# Tiny models compile for longer than they run: skip XLA's expensive backend passes (what JAX's own
# tests do), here and in every process a test starts (they inherit the environment). The programs
# compute the same things; a test that measures compiled memory sets it back to 0 itself.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

# Must run before any backend is initialised so that mesh tests see 8 devices. Unsharded
# computations still run on device 0 alone, so this costs the rest of the suite nothing.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_disable_most_optimizations", os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1")

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


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo_id: str, folder: str, *, repo_type: str = "model", commit: str = COMMIT, ref: str = "main",
              skip=()) -> str:
    """``folder``'s files as huggingface_hub caches repo ``repo_id`` under ``root`` (HF_HUB_CACHE):
    content-addressed blobs, a snapshot of relative symlinks, the ref, and the cached tree listing
    (the listing names every file, so a snapshot missing ``skip`` reads as an incomplete download)."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    storage = os.path.join(root, f"{repo_type}s--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(storage, "snapshots", commit)
    os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
    entries = {}
    for name in sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs):
        data = open(os.path.join(folder, name), "rb").read()
        digest = hashlib.sha256(data).hexdigest()
        large = name.endswith(".safetensors")  # LFS files are cached under their sha256, others their git sha1
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        etag = digest if large else blob_id
        entries[name] = TreeCacheEntry(size=len(data), blob_id=blob_id, lfs_sha256=digest if large else None,
                                       lfs_size=len(data) if large else None)
        if name in skip:
            continue
        with open(os.path.join(storage, "blobs", etag), "wb") as f:
            f.write(data)
        link = os.path.join(snapshot, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(storage, "blobs", etag), os.path.dirname(link)), link)
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    with open(os.path.join(storage, "refs", ref), "w") as f:
        f.write(commit)
    write_tree_cache(storage, commit, entries)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline, as HF_HOME + HF_HUB_OFFLINE=1 would make it."""
    from huggingface_hub import constants

    cache = str(tmp_path / "hf" / "hub")
    os.makedirs(cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    import datasets  # its cache of prepared (arrow) datasets, also under HF_HOME

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    return cache


def online_loop(tiny_checkpoint, tmp, mesh_shape, variant="sail_mixed", sail=None, train_kind="preference",
                generation=None, **reference):
    """An OnlineLoop of ``variant`` on the tiny checkpoint and 64 synthetic pairs (no training run): 16
    prompts a batch, 3 samples per prompt (where the opponent does not fix it), 10 new tokens under a
    response cap of 12, rewarded by their word count."""
    from sail_jax.configs import sail_config
    from sail_jax.data.pipeline import encode_online
    from sail_jax.data.records import Records
    from sail_jax.models import load_pretrained
    from sail_jax.online import OnlineLoop
    from sail_jax.rewards import OracleReward
    from sail_jax.sharding import make_mesh
    from sail_jax.tokenization import Tokenizer

    config = sail_config(variant)
    config.model.path = tiny_checkpoint
    config.data.max_prompt_length, config.data.max_response_length = 40, 12
    config.generation.max_new_tokens = 10  # < max_response_length: padded
    config.sail.num_samples = {"policy": 3, "reference": 2, "mixture": 2, "data": 1}[config.sail.opponent]
    config.sail.update(sail or {})
    config.generation.update(generation or {})
    config.batch_size, config.eval_batch_size = 16, 16
    config.reference.update(reference)
    config.data.train_kind = train_kind
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    rows = synthetic_pairs(64)
    enc = encode_online(Records(rows), tokenizer, max_prompt_length=40, max_response_length=12)
    train = encode_online(Records([{"prompt": r["prompt"]} for r in rows]), tokenizer, max_prompt_length=40,
                          max_response_length=12, prompts_only=True) if train_kind == "prompt" else enc
    mesh = make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    # Reward: response length in tokens' characters, so PR labels are checkable and ties happen.
    reward = OracleReward(lambda prompt, response: float(len(response.split())))
    return OnlineLoop(config, model=load_pretrained(tiny_checkpoint), tokenizer=tokenizer, mesh=mesh,
                      train_arrays=train.arrays, train_prompts=[r["prompt"] for r in rows],
                      reward_source=reward, workdir=str(tmp),
                      evaluator_args={"prompts": [r["prompt"] for r in rows[:16]],
                                      "eval_arrays": {k: v[:16] for k, v in enc.arrays.items()}, "batch_size": 16})
