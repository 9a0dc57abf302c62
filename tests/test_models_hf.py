"""Our nnx models against transformers (PyTorch, CPU) on tiny random checkpoints, and checkpoint I/O."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import left_padded_batch, random_hf_model, torch_logits
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sail_jax.models import CausalLM, RewardModel, init_cache, load_pretrained, save_pretrained

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}

CAUSAL_CASES = {
    "llama": ("LlamaForCausalLM", {}),
    "llama_bias_llama3_rope_tied": ("LlamaForCausalLM", dict(
        attention_bias=True, mlp_bias=True, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "llama_linear_rope_headdim": ("LlamaForCausalLM", dict(
        head_dim=12, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0})),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen2_tied_sliding": ("Qwen2ForCausalLM", dict(
        tie_word_embeddings=True, use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "mistral_window": ("MistralForCausalLM", dict(sliding_window=4)),
}


def _assert_close_on_mask(ours, ref, mask, atol):
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], ref[valid], atol=atol, rtol=0)


@pytest.mark.parametrize("case", sorted(CAUSAL_CASES))
def test_causal_lm_logits_match_transformers_on_left_padded_batch(case, save_hf):
    cls_name, overrides = CAUSAL_CASES[case]
    hf = random_hf_model(cls_name, **overrides)
    model = load_pretrained(save_hf(hf))
    assert isinstance(model, CausalLM)
    ids, mask = left_padded_batch(97, batch=4, length=11)
    ours = model(jnp.asarray(ids), jnp.asarray(mask))
    assert ours.shape == (4, 11, 97) and ours.dtype == jnp.float32
    _assert_close_on_mask(ours, torch_logits(hf, ids, mask), mask, atol=1e-4)


@pytest.mark.parametrize("case", ["llama", "mistral_window"])
def test_long_rows_take_blockwise_causal_attention_and_match_transformers(case, save_hf):
    """Rows of 300 tokens go through the blockwise causal attention (2 query blocks), one of them
    left-padded past the first block."""
    cls_name, overrides = CAUSAL_CASES[case]
    hf = random_hf_model(cls_name, max_position_embeddings=512, **overrides)
    ids, mask = left_padded_batch(97, batch=2, length=300)
    mask[1, :170] = 0
    ours = load_pretrained(save_hf(hf))(jnp.asarray(ids), jnp.asarray(mask))
    _assert_close_on_mask(ours, torch_logits(hf, ids, mask), mask, atol=1e-4)


def test_left_padding_does_not_change_a_rows_logits(save_hf):
    model = load_pretrained(save_hf(random_hf_model("MistralForCausalLM", sliding_window=4)))
    ids, mask = left_padded_batch(97, batch=3, length=10)
    padded = model(jnp.asarray(ids), jnp.asarray(mask))
    n = int(mask[2].sum())
    alone = model(jnp.asarray(ids[2:3, -n:]), jnp.ones((1, n), jnp.int32))
    np.testing.assert_allclose(padded[2, -n:], alone[0], atol=1e-5)


@pytest.mark.parametrize("case", ["llama", "qwen2_tied_sliding", "mistral_window"])
def test_kv_cache_prefill_then_decode_equals_full_forward(case, save_hf):
    cls_name, overrides = CAUSAL_CASES[case]
    model = load_pretrained(save_hf(random_hf_model(cls_name, **overrides)))
    ids, mask = left_padded_batch(97, batch=3, length=12)
    full = model(jnp.asarray(ids), jnp.asarray(mask))
    prompt_len = 7
    cache = init_cache(model.config, batch_size=3, max_len=16)
    logits, cache = model.extend(jnp.asarray(ids[:, :prompt_len]), jnp.asarray(mask[:, :prompt_len]), cache)
    steps = [logits]
    for t in range(prompt_len, 12):
        logits, cache = model.extend(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
        steps.append(logits)
    assert int(cache.end) == 12
    _assert_close_on_mask(jnp.concatenate(steps, axis=1), np.asarray(full), mask, atol=1e-5)


@pytest.mark.parametrize("cls_name", ["LlamaForSequenceClassification", "Qwen2ForSequenceClassification"])
def test_reward_model_scores_match_transformers(cls_name, save_hf):
    import torch

    pad = 0
    hf = random_hf_model(cls_name, num_labels=1, pad_token_id=pad)
    model = load_pretrained(save_hf(hf))
    assert isinstance(model, RewardModel)
    ids, mask = left_padded_batch(97, batch=4, length=9, pad_id=pad)
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref = hf(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                 position_ids=torch.tensor(positions).long()).logits[:, 0].numpy()
    scores = model(jnp.asarray(ids), jnp.asarray(mask))
    assert scores.shape == (4,)
    np.testing.assert_allclose(scores, ref, atol=1e-4)


def test_reward_model_takes_last_real_token_with_right_padding(save_hf):
    import torch

    pad = 0
    hf = random_hf_model("LlamaForSequenceClassification", num_labels=1, pad_token_id=pad)
    model = load_pretrained(save_hf(hf))
    ids = np.array([[5, 6, 7, 8], [9, 10, pad, pad]], np.int32)
    mask = (ids != pad).astype(np.int32)
    with torch.no_grad():
        ref = hf(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits[:, 0].numpy()
    np.testing.assert_allclose(model(jnp.asarray(ids), jnp.asarray(mask)), ref, atol=1e-4)


@pytest.mark.parametrize("case", ["llama_bias_llama3_rope_tied", "qwen2", "mistral_window"])
def test_round_trip_ours_to_transformers(case, save_hf, tmp_path):
    import transformers

    cls_name, overrides = CAUSAL_CASES[case]
    hf = random_hf_model(cls_name, **overrides)
    model = load_pretrained(save_hf(hf))
    out = str(tmp_path / "exported")
    save_pretrained(model, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == cls_name
    ids, mask = left_padded_batch(97, batch=3, length=8)
    _assert_close_on_mask(model(jnp.asarray(ids), jnp.asarray(mask)), torch_logits(reloaded, ids, mask), mask, 1e-4)


def test_round_trip_reward_model_to_transformers(save_hf, tmp_path):
    import torch
    import transformers

    hf = random_hf_model("Qwen2ForSequenceClassification", num_labels=1, pad_token_id=0)
    model = load_pretrained(save_hf(hf))
    out = str(tmp_path / "exported_rm")
    save_pretrained(model, out)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = np.array([[3, 4, 5, 6]], np.int32)
    with torch.no_grad():
        ref = reloaded(torch.tensor(ids).long()).logits[:, 0].numpy()
    np.testing.assert_allclose(model(jnp.asarray(ids)), ref, atol=1e-4)


def test_sharded_save_writes_index_and_loads_back(save_hf, tmp_path):
    model = load_pretrained(save_hf(random_hf_model("Qwen2ForCausalLM")))
    out = str(tmp_path / "sharded")
    save_pretrained(model, out, max_shard_bytes=20_000)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    again = load_pretrained(out)
    ids, mask = left_padded_batch(97, batch=2, length=6)
    np.testing.assert_array_equal(model(jnp.asarray(ids), jnp.asarray(mask)), again(jnp.asarray(ids), jnp.asarray(mask)))


def test_bfloat16_load_keeps_bf16_params_and_close_logits(save_hf):
    path = save_hf(random_hf_model("LlamaForCausalLM"))
    f32 = load_pretrained(path)
    bf16 = load_pretrained(path, dtype=jnp.bfloat16)
    assert bf16.model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    ids, mask = left_padded_batch(97, batch=2, length=8)
    a, b = f32(jnp.asarray(ids), jnp.asarray(mask)), bf16(jnp.asarray(ids), jnp.asarray(mask))
    assert b.dtype == jnp.float32
    scale = float(jnp.abs(a).max())
    assert float(jnp.abs(a - b)[mask.astype(bool)].max()) < 0.05 * scale


def test_float32_weights_for_bfloat16_compute_start_where_the_forward_pass_rounds_them(save_hf):
    """A float16 checkpoint (SmolLM2's GGUF is one) loaded as float32 weights with bfloat16 compute: every
    weight starts on the bfloat16 grid, so the forward pass is the pure-bfloat16 model's, bit for bit, and
    no weight sits halfway between two bfloat16 values, where any update of 1e-6 moved it a whole step
    (SmolLM2's first DPO step at lr 1e-6 then cost 47 nats of log-probability)."""
    import torch
    from flax import nnx

    path = save_hf(random_hf_model("LlamaForCausalLM").to(torch.float16))
    mixed = load_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    pure = load_pretrained(path, dtype=jnp.bfloat16)
    halfway = 0
    for a, b in zip(jax.tree.leaves(nnx.state(mixed, nnx.Param)), jax.tree.leaves(nnx.state(pure, nnx.Param))):
        a = np.asarray(a)
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, np.asarray(b.astype(jnp.float32)))
        halfway += int(np.sum((a.view(np.uint32) & 0xFFFF) == 0x8000))
    assert halfway == 0
    ids, mask = left_padded_batch(97, batch=2, length=8)
    np.testing.assert_array_equal(mixed(jnp.asarray(ids), jnp.asarray(mask)), pure(jnp.asarray(ids), jnp.asarray(mask)))
    f16 = load_pretrained(path, param_dtype=jnp.float32)  # float32 compute keeps the checkpoint's values
    q = np.asarray(f16.model.layers[0].self_attn.q_proj.kernel[...])
    assert np.mean((q.view(np.uint32) & 0xFFFF) == 0x8000) > 0.05  # float16's halfway points, which the snap removes


def test_load_straight_into_sharded_layout(save_hf):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))

    def shardings(path, shape):
        # Split heads of q/k/v over `tensor` where they divide, replicate everything else.
        if path.endswith(("q_proj.kernel", "k_proj.kernel", "v_proj.kernel")) and shape[1] % 2 == 0:
            return NamedSharding(mesh, P(None, "tensor" if shape[1] % 4 == 0 else None, None))
        return NamedSharding(mesh, P())

    path = save_hf(random_hf_model("LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=4))
    sharded = load_pretrained(path, shardings=shardings)
    q = sharded.model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P(None, "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 1, 8)
    plain = load_pretrained(path)
    ids, mask = left_padded_batch(97, batch=2, length=6)
    np.testing.assert_allclose(sharded(jnp.asarray(ids), jnp.asarray(mask)), plain(jnp.asarray(ids), jnp.asarray(mask)), atol=1e-5)


# ---------------------------------------------------------------------------------- bad checkpoints
def _edit_checkpoint(path, edit):
    from safetensors.numpy import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(save_hf):
    path = save_hf(random_hf_model("LlamaForCausalLM"))
    _edit_checkpoint(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        load_pretrained(path)


def test_unexpected_tensor_is_named(save_hf):
    path = save_hf(random_hf_model("LlamaForCausalLM"))
    _edit_checkpoint(path, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.0.extra.weight'\]"):
        load_pretrained(path)


def test_wrong_shape_is_named_with_both_shapes(save_hf):
    path = save_hf(random_hf_model("LlamaForCausalLM"))
    _edit_checkpoint(path, lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    with pytest.raises(ValueError, match=r"model.norm.weight: checkpoint \(31,\) != expected \(32,\)"):
        load_pretrained(path)


def test_unknown_architecture_lists_supported(save_hf):
    path = save_hf(random_hf_model("LlamaForCausalLM"))
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["architectures"] = ["GPTNeoXForCausalLM"]
    with open(config_file, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"GPTNeoXForCausalLM.*not supported; supported: \['LlamaForCausalLM'"):
        load_pretrained(path)


def test_folder_without_safetensors_says_how_to_fix(save_hf):
    path = save_hf(random_hf_model("LlamaForCausalLM"))
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="safe_serialization=True"):
        load_pretrained(path)
