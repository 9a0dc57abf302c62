"""Tokenizer wrapper on a BPE tokenizer trained offline by the test itself."""

import numpy as np
import pytest

from sail_jax.tokenization import (
    EncodedPair,
    Tokenizer,
    TruncationError,
    pack_pairs,
    pad_left,
    train_bpe_tokenizer,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "write a short poem about the sea",
    "answer in all lowercase and do not use commas",
    "hello world, this is a tiny corpus for a tiny tokenizer",
] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    train_bpe_tokenizer(CORPUS, path, vocab_size=300)
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.from_pretrained(tokenizer_dir)


def test_saved_tokenizer_reloads_with_same_encoding_and_specials(tokenizer_dir, tok):
    fresh = train_bpe_tokenizer(CORPUS, vocab_size=300)
    text = "the lazy fox writes a poem"
    assert tok.hf.encode(text) == fresh.hf.encode(text)
    assert tok.decode(tok.hf.encode(text)) == text
    assert tok.hf.convert_ids_to_tokens(tok.eos_id) == "<|im_end|>"
    assert tok.pad_id != tok.eos_id


def test_plain_prompt_and_response_get_eos_appended(tok):
    pair = tok.encode_pair("write a poem", " about the sea", max_prompt_length=64, max_length=128)
    assert tok.decode(pair.prompt_ids) == "write a poem"
    assert pair.response_ids[-1] == tok.eos_id
    assert tok.decode(pair.response_ids) == " about the sea"


def test_chat_template_splits_exactly_at_the_assistant_turn(tok):
    prompt = [{"role": "user", "content": "write a short poem"}]
    prompt_text = tok.render_prompt(prompt)
    assert prompt_text == "<|im_start|>user\nwrite a short poem<|im_end|>\n<|im_start|>assistant\n"
    pair = tok.encode_pair(prompt, "the sea is blue", max_prompt_length=64, max_length=128)
    full = tok.decode(pair.prompt_ids + pair.response_ids, skip_special_tokens=False)
    assert full == prompt_text + "the sea is blue<|im_end|>"
    assert pair.response_ids[-1] == tok.eos_id  # ends at EOS like a sampled response
    as_messages = tok.encode_pair(prompt, [{"role": "assistant", "content": "the sea is blue"}],
                                  max_prompt_length=64, max_length=128)
    assert as_messages == pair


def test_nothing_is_cut_an_over_long_prompt_or_pair_raises(tok):
    prompt, response = "the quick brown fox jumps over the lazy dog", " hello world this is a tiny corpus"
    full = tok.encode_pair(prompt, response, max_prompt_length=100, max_length=100)
    n_prompt, n_response = len(full.prompt_ids), len(full.response_ids)
    exact = tok.encode_pair(prompt, response, max_prompt_length=n_prompt, max_length=n_prompt + n_response)
    assert exact == full
    with pytest.raises(TruncationError, match=f"the prompt has {n_prompt} tokens > data.max_prompt_length"):
        tok.encode_pair(prompt, response, max_prompt_length=n_prompt - 1, max_length=100)
    with pytest.raises(TruncationError, match=f"{n_prompt} \\+ {n_response} tokens > data.max_length"):
        tok.encode_pair(prompt, response, max_prompt_length=100, max_length=n_prompt + n_response - 1)


def test_conversation_without_template_is_a_clear_error():
    plain = train_bpe_tokenizer(CORPUS, vocab_size=280, chat_template=None)
    with pytest.raises(ValueError, match="chat_template"):
        plain.render_prompt([{"role": "user", "content": "hi"}])


def test_pad_left_and_pack_pairs_masks():
    ids, mask = pad_left([[1, 2, 3], [4]], length=4, pad_id=0)
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3], [0, 0, 0, 4]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    batch = pack_pairs([EncodedPair([1, 2], [3, 4, 5]), EncodedPair([6], [7])], length=6, pad_id=0)
    np.testing.assert_array_equal(batch["input_ids"], [[1, 2, 3, 4, 5, 0], [6, 7, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="sequence 0 has 3 tokens > length 2"):
        pad_left([[1, 2, 3]], length=2, pad_id=0)


def test_missing_tokenizer_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))
