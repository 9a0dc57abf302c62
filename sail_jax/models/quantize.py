"""A frozen base stored quantized (QLoRA): the projections' kernels as int8 or NF4 codes plus scales.

Why: with LoRA the base never changes, so it need not be held in 16 or 32 bits. Each projection's
kernel (logical shape ``[*in, *out]``) is replaced by codes and ``kernel_scale``; ``Linear``
dequantizes it in the forward pass (in float32, then cast to the compute dtype), so gradients reach
the adapters through the same weights the forward used. Only ``Linear`` projections are quantized;
embeddings, norms, ``lm_head`` and a reward model's head keep their storage dtype, as in QLoRA.

- ``int8``: symmetric, one scale per output channel (absmax over the input axes / 127), the
  vector-wise scheme of LLM.int8() without its outlier split. Codes ``int8``, same shape as the kernel;
  scales ``[1, …, 1, *out]``. 1 byte a weight.
- ``nf4``: QLoRA's 4-bit NormalFloat: blocks of 64 consecutive weights along the last input axis (the
  input dimension of the PyTorch weight, which is what bitsandbytes blocks over), each scaled by its
  absmax and rounded to the nearest of the 16 NF4 levels. Two codes a byte, packed along the last
  output axis (codes ``uint8 [..., out_last / 2]``); scales ``[..., in_last / 64, *out]``. 4.5 bits a
  weight with the float32 scales (no double quantization). Where the last input axis is not a
  multiple of 64 (tiny test models), the block is its largest divisor up to 64.

Checked against bitsandbytes (``tests/test_quantize.py``): our NF4 and int8 dequantized kernels equal
``dequantize_4bit(quantize_4bit(W, blocksize=64, quant_type="nf4"))`` and ``int8_vectorwise_quant``'s.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

KINDS = ("int8", "nf4")
NF4_BLOCK = 64

# The 16 NormalFloat4 levels (Dettmers et al., QLoRA, 2023, appendix E; bitsandbytes' NF4 code book).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


def _block(dim: int) -> int:
    return max(b for b in range(1, NF4_BLOCK + 1) if dim % b == 0)


def quantize_kernel(kernel: jax.Array, n_in: int, kind: str) -> tuple[jax.Array, jax.Array]:
    """``(codes, scales)`` of ``kernel [*in, *out]`` (the first ``n_in`` axes are the input axes)."""
    w = jnp.asarray(kernel, jnp.float32)
    if kind == "int8":
        absmax = jnp.max(jnp.abs(w), axis=tuple(range(n_in)), keepdims=True)
        scales = jnp.where(absmax > 0, absmax, 1.0) / 127.0
        return jnp.clip(jnp.round(w / scales), -127, 127).astype(jnp.int8), scales
    if kind != "nf4":
        raise ValueError(f"quantization {kind!r}: valid kinds are {list(KINDS)}")
    if w.shape[-1] % 2:
        raise ValueError(f"nf4 packs two codes a byte along the last axis; this kernel {w.shape} has an odd one")
    axis, dim = n_in - 1, w.shape[n_in - 1]
    blocks = w.reshape(*w.shape[:axis], dim // _block(dim), _block(dim), *w.shape[axis + 1:])
    absmax = jnp.max(jnp.abs(blocks), axis=axis + 1, keepdims=True)
    absmax = jnp.where(absmax > 0, absmax, 1.0)
    codes = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), blocks / absmax).astype(jnp.uint8).reshape(w.shape)
    packed = (codes[..., 0::2] << 4) | codes[..., 1::2]
    return packed, jnp.squeeze(absmax, axis + 1)


def dequantize_kernel(codes: jax.Array, scales: jax.Array, n_in: int, kind: str) -> jax.Array:
    """The float32 kernel ``[*in, *out]`` that ``(codes, scales)`` stand for."""
    if kind == "int8":
        return codes.astype(jnp.float32) * scales
    high, low = codes >> 4, codes & 0xF
    idx = jnp.stack([high, low], axis=-1).reshape(*codes.shape[:-1], 2 * codes.shape[-1])
    w = jnp.asarray(NF4_LEVELS)[idx.astype(jnp.int32)]
    axis = n_in - 1
    n_blocks = scales.shape[axis]
    blocks = w.reshape(*w.shape[:axis], n_blocks, w.shape[axis] // n_blocks, *w.shape[axis + 1:])
    return (blocks * jnp.expand_dims(scales, axis + 1)).reshape(w.shape)


def quantize_model(model: nnx.Module, kind: str, pattern: str = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|"
                                                               r"down_proj)$") -> int:
    """Store the kernel of every projection whose path matches ``pattern`` quantized (in place); returns
    how many. Call it on the base before attaching adapters: the base's graph is then the quantized
    one, which is also the reference's."""
    from sail_jax.models.transformer import Linear

    if kind not in KINDS:
        raise ValueError(f"quantization {kind!r}: valid kinds are {list(KINDS)}")
    regex, count = re.compile(pattern), 0
    for path, layer in nnx.iter_graph(model):
        if isinstance(layer, Linear) and regex.search(".".join(map(str, path))) and layer.quant is None:
            codes, scales = quantize_kernel(layer.kernel[...], layer.n_in, kind)
            layer.kernel = nnx.Param(codes)
            layer.kernel_scale = nnx.Param(scales)
            layer.quant = kind
            count += 1
    return count


def dequantize_layer(layer) -> None:
    """Replace a quantized ``Linear``'s codes by the kernel they stand for, in its storage dtype (merge
    and export write plain kernels)."""
    kernel = dequantize_kernel(layer.kernel[...], layer.kernel_scale[...], layer.n_in, layer.quant)
    layer.kernel = nnx.Param(kernel.astype(layer.weight_dtype))
    layer.kernel_scale = None
    layer.quant = None

