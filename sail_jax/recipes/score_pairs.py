"""Score preference pairs under a policy and a reference: log-probs, implicit rewards, DPO loss.

With no ``model.path`` it builds the built-in tiny model (a BPE tokenizer trained on the sample
pairs and a random Qwen2-architecture model), writes it as a Hugging Face folder into the workdir and
loads it back from disk, so the whole checkpoint → tokenizer → forward → loss path runs end to end.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from sail_jax.data import read_jsonl
from sail_jax.data.pipeline import encode_preference
from sail_jax.data.records import Records
from sail_jax.logprobs import sequence_logprobs
from sail_jax.losses import preference_loss, preference_metrics
from sail_jax.models import ModelConfig, build_model, load_pretrained, save_pretrained
from sail_jax.tokenization import Tokenizer, train_bpe_tokenizer

SAMPLE_PAIRS = [
    {"prompt": "How do I boil an egg?", "chosen": " Put the egg in boiling water for nine minutes, then cool it.",
     "rejected": " Eggs are eggs."},
    {"prompt": "Name a primary colour.", "chosen": " Red is a primary colour.", "rejected": " I would rather not say."},
    {"prompt": [{"role": "user", "content": "Say hello politely."}], "chosen": "Hello, it is nice to meet you.",
     "rejected": "What do you want?"},
    {"prompt": "What is two plus two?", "chosen": " Two plus two is four.", "rejected": " Two plus two is five."},
]


def build_tiny_checkpoint(path: str, *, seed: int = 0) -> str:
    """A small random Qwen2-architecture model + BPE tokenizer saved as a HF folder at ``path``."""
    texts = []
    for r in SAMPLE_PAIRS:
        for field in r.values():
            texts.append(field if isinstance(field, str) else " ".join(m["content"] for m in field))
    tokenizer = train_bpe_tokenizer(texts * 4, vocab_size=320)
    config = ModelConfig(model_type="qwen2", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    save_pretrained(build_model(config, seed=seed), path, tokenizer=tokenizer)
    return path


def _score_fn(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, input_ids, attention_mask, loss_mask):
        logits = nnx.merge(graphdef, state)(input_ids, attention_mask)
        return sequence_logprobs(logits, input_ids, loss_mask)

    return lambda batch: score(state, *(jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask")))


def run(config, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    model_path = config.model.path or build_tiny_checkpoint(os.path.join(workdir, "tiny_model"), seed=config.seed)
    reference_path = config.reference.path or model_path
    dtype = jnp.dtype(config.model.dtype)
    tokenizer = Tokenizer.from_pretrained(config.model.tokenizer_path or model_path)
    d = config.data
    source = read_jsonl(d.path, "preference", d.on_error) if d.path else Records(SAMPLE_PAIRS)
    dropped: list[int] = []  # rows over the lengths (data.on_error=skip); each is reported
    encoded = encode_preference(source, tokenizer, max_prompt_length=d.max_prompt_length, max_length=d.max_length,
                                on_error=d.on_error, dropped=dropped)
    skipped = set(dropped)
    records = [r for i, r in enumerate(source.rows) if i not in skipped]
    for i in dropped:
        print(f"skipped {source.origin(i)}: longer than data.max_prompt_length/max_length")
    chosen, rejected = ({k: encoded.arrays[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "loss_mask")}
                        for side in ("chosen", "rejected"))
    policy = _score_fn(load_pretrained(model_path, dtype=dtype))
    reference = policy if reference_path == model_path else _score_fn(load_pretrained(reference_path, dtype=dtype))
    (c, c_len), (r, r_len) = policy(chosen), policy(rejected)
    rc, _ = reference(chosen)
    rr, _ = reference(rejected)
    beta = config.loss.beta
    loss = preference_loss(config.loss.loss_type, c, r, rc, rr, beta=beta, chosen_lengths=c_len,
                           rejected_lengths=r_len)
    metrics = {k: float(v) for k, v in preference_metrics(c, r, rc, rr, beta=beta).items()}
    metrics[f"loss/{config.loss.loss_type}"] = float(jnp.mean(loss))

    rows = []
    print(f"model: {model_path}\nreference: {reference_path}\n")
    print(f"{'#':>2}  {'prompt':<28} {'len_w':>5} {'len_l':>5} {'logp_w':>9} {'logp_l':>9} {'margin':>8}")
    for i, rec in enumerate(records):
        prompt = tokenizer.render_prompt(rec["prompt"]).replace("\n", " ")
        margin = beta * float((c[i] - rc[i]) - (r[i] - rr[i]))
        rows.append({"prompt": prompt, "chosen_logp": float(c[i]), "rejected_logp": float(r[i]),
                     "chosen_length": int(c_len[i]), "rejected_length": int(r_len[i]), "reward_margin": margin})
        print(f"{i:>2}  {prompt[:28]:<28} {int(c_len[i]):>5} {int(r_len[i]):>5} {float(c[i]):>9.3f} "
              f"{float(r[i]):>9.3f} {margin:>8.4f}")
    print("\n" + "\n".join(f"{k:<22} {v:.4f}" for k, v in metrics.items()))
    with open(os.path.join(workdir, "scores.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics
