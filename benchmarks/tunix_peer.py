"""Tunix (google-tunix, JAX) as a benchmark peer: its Llama3 model loaded from the same Hugging Face
folder our model loads, its `Sampler`, and its DPO loss step. A benchmark reference only, never a
runtime dependency. Tunix pins safetensors < 0.8 while transformers needs >= 0.8 (its loader works on
0.8), so it is installed without its dependency resolution:

    pip install --no-deps google-tunix==0.1.7 google-metrax==0.2.4 clu jaxtyping wadler_lindig \
        sentencepiece perfetto pandas
"""

from __future__ import annotations

import importlib
import json
import os

INSTALL = ("pip install --no-deps google-tunix==0.1.7 google-metrax==0.2.4 clu jaxtyping wadler_lindig "
           "sentencepiece perfetto pandas")


def available() -> str | None:
    """None when Tunix imports, else why not and the line that installs it."""
    try:
        for module in ("tunix.generate.sampler", "tunix.models.llama3.model", "tunix.sft.dpo.dpo_trainer"):
            importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - any import failure means the column is skipped
        return f"Tunix columns skipped ({type(error).__name__}: {error}); install with: {INSTALL}"
    return None


def load_llama(path: str):
    """Tunix's Llama3 from the HF folder ``path`` (float32), its config read from config.json."""
    from tunix.models.llama3 import model as model_lib
    from tunix.models.llama3 import params

    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    rope = hf.get("rope_parameters") or {}
    config = model_lib.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(rope.get("rope_theta", hf.get("rope_theta", 10000))),
        norm_eps=hf["rms_norm_eps"], weight_tying=hf.get("tie_word_embeddings", False))
    return params.create_model_from_safe_tensors(path, config), config


class _IdTokenizer:
    """Token ids written as text ("5 17 3"): Tunix's Sampler takes strings, the benchmark has ids. No BOS
    is added (bos_id 0 is falsy to Tunix) and pad is 0."""

    def encode(self, text, **kwargs):
        return [int(t) for t in text.split()]

    def decode(self, ids, **kwargs):
        return " ".join(map(str, ids))

    def bos_id(self):
        return 0

    def eos_id(self):
        return -1

    def pad_id(self):
        return 0


def sampler(model, config, cache_size: int):
    """A Tunix ``Sampler`` over ``model`` whose prompts are id lists; call the result with
    ``(ids, new_tokens, temperature)`` to sample every row for exactly ``new_tokens`` tokens."""
    from tunix.generate import sampler as sampler_lib

    s = sampler_lib.Sampler(model, _IdTokenizer(), sampler_lib.CacheConfig(
        cache_size=cache_size, num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim))

    def run(ids, new_tokens: int, temperature: float, seed: int = 0):
        texts = [" ".join(map(str, row)) for row in ids]
        kwargs = dict(temperature=temperature, top_p=1.0) if temperature > 0 else {}
        out = s(texts, max_generation_steps=new_tokens, max_prompt_length=ids.shape[1], eos_tokens=[-1],
                seed=seed, **kwargs)
        return out.tokens

    return run


def dpo_step(path: str, batch: dict, lr: float, beta: float = 0.1):
    """One step of Tunix's ``DPOTrainer`` as its ``train()`` loop runs it: the reference log-probs in
    their own jitted call (``_prepare_inputs``), then the jitted policy step (nnx graph cached, AdamW).
    ``batch`` is the benchmark's: pairs of rows sharing their first half (the prompt). Returns a
    no-argument step that returns the step's loss."""
    import optax
    from tunix.sft.dpo import dpo_trainer

    policy, _ = load_llama(path)
    reference, _ = load_llama(path)
    half = batch["chosen_input_ids"].shape[1] // 2
    example = dpo_trainer.TrainingInput(
        prompt_ids=batch["chosen_input_ids"][:, :half], prompt_mask=batch["chosen_attention_mask"][:, :half],
        chosen_ids=batch["chosen_input_ids"][:, half:], chosen_mask=batch["chosen_attention_mask"][:, half:],
        rejected_ids=batch["rejected_input_ids"][:, half:],
        rejected_mask=batch["rejected_attention_mask"][:, half:])
    trainer = dpo_trainer.DPOTrainer(
        policy, reference, optax.adamw(lr, weight_decay=0.0),
        dpo_trainer.DPOTrainingConfig(eval_every_n_steps=1 << 30, max_steps=1 << 30, beta=beta,
                                      pbar_description=None))
    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)

    def step():
        loss, _, _ = train_step(trainer._prepare_inputs(example))
        return float(loss)

    return step
