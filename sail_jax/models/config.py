"""Model configuration: one frozen dataclass for the Llama / Qwen2 / Mistral family.

It is read from (and written back to) a Hugging Face ``config.json`` so checkpoints round-trip, and
it is hashable so it can live as a static attribute of nnx modules and jitted functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# HF architecture name -> (model_type, task).
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "causal_lm"),
    "Qwen2ForCausalLM": ("qwen2", "causal_lm"),
    "MistralForCausalLM": ("mistral", "causal_lm"),
    "LlamaForSequenceClassification": ("llama", "sequence_classification"),
    "Qwen2ForSequenceClassification": ("qwen2", "sequence_classification"),
    "MistralForSequenceClassification": ("mistral", "sequence_classification"),
}
_ARCH_PREFIX = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
_TASK_SUFFIX = {"causal_lm": "ForCausalLM", "sequence_classification": "ForSequenceClassification"}
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# What a decoder layer keeps for the backward pass (see transformer.REMAT_POLICIES): everything, only
# the outputs of its matmuls, or only its input (the layer is recomputed in the backward pass).
REMAT = ("none", "dots", "full")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters. Shapes: hidden ``d``, heads ``h``, KV heads ``k``."""

    model_type: str = "llama"
    task: str = "causal_lm"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Extra RoPE parameters as sorted (key, value) pairs, e.g. (("factor", 8.0), ("rope_type", "llama3"), ...).
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # Per-layer sliding window (None = full attention), one entry per layer.
    sliding_windows: tuple[int | None, ...] | None = None
    num_labels: int = 1
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # activation checkpointing per decoder layer, one of REMAT (not part of config.json)

    def __post_init__(self):
        if self.model_type not in _ARCH_PREFIX:
            raise ValueError(f"model_type={self.model_type!r} is not supported; valid: {sorted(_ARCH_PREFIX)}")
        if self.task not in _TASK_SUFFIX:
            raise ValueError(f"task={self.task!r} is not supported; valid: {sorted(_TASK_SUFFIX)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (grouped-query attention)"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; valid: {sorted(DTYPES)}")
        if self.remat not in REMAT:
            raise ValueError(f"remat={self.remat!r} is not supported; valid: {list(REMAT)}")
        rope_type = self.rope_params.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={rope_type!r} is not supported; valid: {list(ROPE_TYPES)}")
        if self.sliding_windows is not None and len(self.sliding_windows) != self.num_layers:
            raise ValueError(
                f"sliding_windows has {len(self.sliding_windows)} entries but num_layers={self.num_layers}"
            )

    @property
    def rope_params(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @property
    def architecture(self) -> str:
        return _ARCH_PREFIX[self.model_type] + _TASK_SUFFIX[self.task]

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def window(self, layer: int) -> int | None:
        return None if self.sliding_windows is None else self.sliding_windows[layer]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json <-> ours
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json", **overrides) -> "ModelConfig":
        """Build from a HF ``config.json`` dict (transformers 4.x and 5.x layouts)."""
        archs = hf.get("architectures") or []
        if len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise ValueError(
                f"{source}: architectures={archs!r} is not supported; supported: {sorted(ARCHITECTURES)}"
            )
        model_type, task = ARCHITECTURES[archs[0]]
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act={act!r} is not supported (only 'silu', SwiGLU MLPs)")
        num_heads = hf["num_attention_heads"]
        num_layers = hf["num_hidden_layers"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        # transformers 5 nests RoPE settings in `rope_parameters`; 4.x used `rope_theta` + `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        if rope.get("rope_type", "default") == "default":
            rope = {}
        elif rope.get("rope_type") == "llama3":
            rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
        if model_type == "llama":
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        elif model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = False
        windows = _sliding_windows(model_type, hf, num_layers)
        eos = hf.get("eos_token_id")
        config = cls(
            model_type=model_type,
            task=task,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=tuple(sorted(rope.items())),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_windows=windows,
            num_labels=_num_labels(hf) if task == "sequence_classification" else 1,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )
        return config.replace(**overrides) if overrides else config

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' Auto classes load into the same architecture."""
        rope = {"rope_theta": self.rope_theta, "rope_type": "default", **self.rope_params}
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.param_dtype,
        }
        if self.model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise ValueError("Llama checkpoints have one attention_bias flag for q/k/v/o; got qkv_bias != o_bias")
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = self.mlp_bias
        windows = {w for w in (self.sliding_windows or ()) if w is not None}
        if len(windows) > 1:
            raise ValueError(f"cannot express several sliding-window sizes {sorted(windows)} in a HF config")
        window = windows.pop() if windows else None
        if self.model_type == "mistral":
            hf["sliding_window"] = window
        elif self.model_type == "qwen2":
            hf["use_sliding_window"] = window is not None
            hf["sliding_window"] = window
            hf["layer_types"] = [
                "full_attention" if w is None else "sliding_attention" for w in (self.sliding_windows or [None] * self.num_layers)
            ]
            hf["max_window_layers"] = self.num_layers
        if self.task == "sequence_classification":
            hf["num_labels"] = self.num_labels
            hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            hf["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return hf


def _num_labels(hf: dict[str, Any]) -> int:
    if "num_labels" in hf:
        return int(hf["num_labels"])
    return len(hf.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"})


def _sliding_windows(model_type: str, hf: dict[str, Any], num_layers: int) -> tuple[int | None, ...] | None:
    """Per-layer windows as transformers applies them (Mistral: every layer; Qwen2: by layer_types)."""
    window = hf.get("sliding_window")
    if model_type == "mistral":
        return None if window is None else (int(window),) * num_layers
    if model_type == "qwen2":
        if not hf.get("use_sliding_window", False) or window is None:
            return None
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
            for i in range(num_layers)
        ]
        windows = tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
        return windows if any(w is not None for w in windows) else None
    return None
