"""QLoRA: the frozen base stored as int8 or NF4 codes. The codes equal bitsandbytes' (the reference
implementation of QLoRA's NF4 and LLM.int8()'s vector-wise int8), the quantized model stays close to
the original, fresh adapters over it are exactly the quantized base (the reference), only adapters
train and a sharded step equals one device. (A QLoRA DPO run through the CLI that learns, resumes
exactly and exports plain kernels: tests/test_lora.py.)"""

import os
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sail_jax.configs import base_config
from sail_jax.models import load_pretrained
from sail_jax.models.lora import add_lora, merge_lora
from sail_jax.models.quantize import dequantize_kernel, quantize_kernel, quantize_model
from sail_jax.sharding import bytes_per_device, make_mesh, param_shardings

SHAPES = [((128, 96), 1), ((64, 4, 16), 1), ((4, 64, 96), 2)]  # [d, ffn], q_proj [d, heads, hd], o_proj


def _torch_weight(kernel: np.ndarray, n_in: int):
    """The PyTorch ``nn.Linear`` weight ``[out, in]`` of our kernel ``[*in, *out]``."""
    import torch

    n = int(np.prod(kernel.shape[:n_in]))
    return torch.tensor(kernel.reshape(n, -1).T.copy())


def _as_torch_layout(kernel, n_in):
    return np.asarray(kernel).reshape(int(np.prod(kernel.shape[:n_in])), -1).T


@pytest.mark.parametrize("shape,n_in", SHAPES)
def test_nf4_kernel_equals_bitsandbytes(shape, n_in):
    functional = pytest.importorskip("bitsandbytes.functional")
    kernel = np.random.RandomState(0).randn(*shape).astype(np.float32) * 0.02
    weight = _torch_weight(kernel, n_in)
    codes, stats = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    reference = functional.dequantize_4bit(codes, stats).numpy()
    ours_codes, scales = quantize_kernel(jnp.asarray(kernel), n_in, "nf4")
    assert ours_codes.dtype == jnp.uint8 and ours_codes.size * 2 == kernel.size  # two codes a byte
    assert scales.size * 64 == kernel.size  # one float32 absmax per block of 64
    ours = _as_torch_layout(dequantize_kernel(ours_codes, scales, n_in, "nf4"), n_in)
    np.testing.assert_array_equal(ours, reference)
    assert np.abs(ours - weight.numpy()).max() < 0.3 * np.abs(kernel).max()


@pytest.mark.parametrize("shape,n_in", SHAPES)
def test_int8_kernel_equals_bitsandbytes_vectorwise(shape, n_in):
    functional = pytest.importorskip("bitsandbytes.functional")
    kernel = np.random.RandomState(1).randn(*shape).astype(np.float32) * 0.02
    codes, row_absmax, _ = functional.int8_vectorwise_quant(_torch_weight(kernel, n_in))
    ours_codes, scales = quantize_kernel(jnp.asarray(kernel), n_in, "int8")
    np.testing.assert_array_equal(_as_torch_layout(ours_codes, n_in), codes.numpy())
    np.testing.assert_allclose(_as_torch_layout(dequantize_kernel(ours_codes, scales, n_in, "int8"), n_in),
                               codes.numpy() * row_absmax.numpy()[:, None] / 127, rtol=1e-6, atol=1e-9)


def test_nf4_model_equals_transformers_with_bitsandbytes_nf4(save_hf):
    """End to end: our NF4 base gives the next-token distributions of transformers' model loaded with
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` (bitsandbytes' own CPU
    kernels), far closer than either is to the unquantized model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from conftest import TINY, left_padded_batch, random_hf_model, torch_logits

    # head_dim 64 and hidden 128: every input axis holds whole blocks of 64, as in real models
    path = save_hf(random_hf_model("LlamaForCausalLM", hidden_size=128, intermediate_size=256, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=64))
    ids, mask = left_padded_batch(TINY["vocab_size"], 3, 10)
    full = jax.nn.log_softmax(jnp.asarray(torch_logits(transformers.AutoModelForCausalLM.from_pretrained(path), ids,
                                                       mask)))
    quant_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quant_config,
                                                               dtype=torch.float32, device_map="cpu")
    theirs = jax.nn.log_softmax(jnp.asarray(torch_logits(theirs, ids, mask)))
    model = load_pretrained(path)
    quantize_model(model, "nf4")
    ours = jax.nn.log_softmax(model(ids, mask))

    def kl(p, q):
        return float((jnp.exp(p) * (p - q)).sum(-1)[mask.astype(bool)].mean())

    assert kl(theirs, ours) < 0.02 * kl(full, ours), (kl(theirs, ours), kl(full, ours))
    assert float(jnp.abs(theirs - ours)[mask.astype(bool)].max()) < 0.05


def _ids():
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 100, size=(2, 9)), jnp.int32)
    return ids, jnp.ones_like(ids).at[0, :3].set(0)


@pytest.mark.parametrize("kind,max_logprob_error", [("int8", 0.01), ("nf4", 0.1)])
def test_quantized_base_is_close_fresh_adapters_are_it_and_merging_gives_plain_kernels(tiny_checkpoint, kind,
                                                                                     max_logprob_error):
    model = load_pretrained(tiny_checkpoint)
    ids, mask = _ids()
    full = jax.nn.log_softmax(model(ids, mask))
    assert quantize_model(model, kind) == 2 * 7
    quantized = model(ids, mask)
    assert float(jnp.abs(jax.nn.log_softmax(quantized) - full).max()) < max_logprob_error
    assert float(jnp.abs(jax.nn.log_softmax(quantized) - full).max()) > 0  # it is quantized
    assert jnp.array_equal(quantized.argmax(-1), full.argmax(-1))
    base_graphdef = nnx.graphdef(model)
    add_lora(model, rank=4, alpha=8.0)
    np.testing.assert_array_equal(model(ids, mask), quantized)  # B = 0: exactly the quantized base
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
    np.testing.assert_array_equal(nnx.merge(base_graphdef, base)(ids, mask), quantized)  # the reference
    trained = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), adapters)
    adapted = nnx.merge(graphdef, trained, base)(ids, mask)
    merged = merge_lora(nnx.merge(graphdef, trained, base, copy=True))
    kernels = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(merged))}
    assert not any("kernel_scale" in k for k in kernels)
    assert kernels["model.layers.0.self_attn.q_proj.kernel"].dtype == jnp.float32  # the storage dtype again
    np.testing.assert_allclose(merged(ids, mask), adapted, atol=2e-5)


def test_quantized_base_bytes_and_its_shards():
    """At a real projection's shape (SmolLM2-135M's up_proj, [576, 1536]) NF4 holds 4.5 bits a weight and
    int8 8 (plus one scale per column), and codes and scales split over the mesh like the kernel."""
    kernel = jnp.zeros((576, 1536), jnp.float32)
    nf4 = quantize_kernel(kernel, 1, "nf4")
    int8 = quantize_kernel(kernel, 1, "int8")
    assert sum(x.nbytes for x in nf4) == 576 * 1536 // 2 + (576 // 64) * 1536 * 4  # 0.14x float32
    assert sum(x.nbytes for x in int8) == 576 * 1536 + 1536 * 4
    mesh = make_mesh((1, 4, 2), jax.devices()[:8])
    tree = {"mlp": {"up_proj": {"kernel": nf4[0], "kernel_scale": nf4[1]}}}
    shardings = param_shardings(tree, mesh)
    assert shardings["mlp"]["up_proj"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # 9 rows of blocks: fsdp does not divide them, so the scales split their columns over it instead
    assert shardings["mlp"]["up_proj"]["kernel_scale"].spec == jax.sharding.PartitionSpec(None, ("tensor", "fsdp"))
    placed = jax.device_put(tree, shardings)
    assert max(bytes_per_device(placed).values()) == sum(x.nbytes for x in nf4) // 8  # nothing replicated


def _qlora_step(tiny_checkpoint, mesh_shape, kind):
    from test_lora import _dpo_step

    return _dpo_step(tiny_checkpoint, mesh_shape, lora=True, quantize=kind)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_qlora_trains_only_adapters_and_a_sharded_step_equals_one_device(tiny_checkpoint, kind):
    loss1, params1, _, frozen, before = _qlora_step(tiny_checkpoint, (1, 1, 1), kind)
    names = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(params1)]
    assert names and all(".lora.a" in n or ".lora.b" in n for n in names), names
    codes = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(frozen["base"])}
    assert codes["model.layers.0.mlp.up_proj.kernel"].dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
    chex.assert_trees_all_equal(jax.device_get(frozen["base"]), before["base"])  # frozen: untouched
    loss8, params8, *_ = _qlora_step(tiny_checkpoint, (2, 2, 2), kind)
    assert abs(loss8 - loss1) < 1e-5
    chex.assert_trees_all_close(params8, params1, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank,quantize,message", [
    (8, "fp4", "config.lora.quantize='fp4' is unknown; valid: '' (a base in model.param_dtype), 'int8', 'nf4'"),
    (0, "nf4", "config.lora.quantize='nf4' quantizes a frozen base, which needs LoRA: set config.lora.rank > 0"),
])
def test_qlora_settings_that_cannot_run_fail_before_any_work(tiny_checkpoint, rank, quantize, message):
    from sail_jax.validation import ConfigError, validate_config

    config = base_config("dpo")
    config.model.path, config.data.train_path = tiny_checkpoint, os.path.join(tiny_checkpoint, "config.json")
    config.lora.update(rank=rank, quantize=quantize)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config)
