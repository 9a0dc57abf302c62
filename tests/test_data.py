"""Data: record validation (raise or skip-and-count), TFDS builders for public preference formats,
tokenized arrays, and grain iterators that resume exactly."""

import gzip
import json

import numpy as np
import pytest
from conftest import synthetic_pairs, write_jsonl

from sail_jax.data import read_jsonl
from sail_jax.data.pipeline import encode_preference, encode_sft, eval_batches, train_iterator
from sail_jax.data.records import Records, RecordError
from sail_jax.data.tfds_builders import build, read_tfds
from sail_jax.tokenization import Tokenizer, TruncationError


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "p", "chosen": "c"}', r"pairs.jsonl:2: missing field\(s\) \['rejected'\]"),
    ('{"prompt": "p", "chosen": "c", "rejected": 3}', r"pairs.jsonl:2: field 'rejected' must be a non-empty string"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r"', r"pairs.jsonl:2: invalid JSON at column 47: Expecting ',' "
                                                       r"delimiter; the line ends before its object does"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r', r"pairs.jsonl:2: invalid JSON at column 44: Unterminated "
                                                     r"string starting; the line ends before its object does"),
    ('{"prompt": "p", "chosen": c, "rejected": "r"}', r"pairs.jsonl:2: invalid JSON at column 27: Expecting value$"),
    ('["p", "c", "r"]', r"pairs.jsonl:2: expected a JSON object"),
])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n' + line + "\n")
    with pytest.raises(RecordError, match=message):
        read_jsonl(str(path))


def test_skip_mode_counts_every_bad_row(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": 1}\nnot json\n\n'
                    '{"prompt": "q", "chosen": "c", "rejected": "r"}\n')
    records = read_jsonl(str(path), on_error="skip")
    assert [r["prompt"] for r in records.rows] == ["p", "q"]
    assert records.skipped == 2 and "pairs.jsonl:2" in records.first_error


def test_empty_jsonl_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: the file has no records \(expected one JSON object per line "
                                         r"with \['prompt', 'chosen', 'rejected'\]\)$"):
        read_jsonl(str(path))
    path.write_text('{"prompt": 1}\n')
    with pytest.raises(ValueError, match=r"no usable records .*; all 1 skipped, the first: .*empty.jsonl:1: missing field"):
        read_jsonl(str(path), on_error="skip")


def test_sft_records_accept_preference_rows_and_use_chosen(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                                 {"prompt": "q", "response": "s"}])
    assert [r["response"] for r in read_jsonl(path, "sft").rows] == ["c", "s"]


RAW = {
    "hh_rlhf": [{"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell a joke\n\nAssistant: A good one.",
                 "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell a joke\n\nAssistant: No."}],
    "ultrafeedback": [{"instruction": "Name a fruit", "completions": [
        {"response": "Apple", "overall_score": 9.0}, {"response": "Rock", "overall_score": 2.0},
        {"response": "Pear", "overall_score": 7.5}]},
        {"instruction": "Tie", "completions": [{"response": "a", "overall_score": 5}, {"response": "b", "overall_score": 5}]}],
    "pku_safe_rlhf": [{"prompt": "How to stay safe?", "response_0": "Be careless.", "response_1": "Wear a helmet.",
                       "better_response_id": 1, "safer_response_id": 1}],
}
EXPECTED = {
    "hh_rlhf": {"prompt": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "Tell a joke"}], "chosen": "A good one.", "rejected": "No."},
    "ultrafeedback": {"prompt": [{"role": "user", "content": "Name a fruit"}], "chosen": "Apple", "rejected": "Rock"},
    "pku_safe_rlhf": {"prompt": [{"role": "user", "content": "How to stay safe?"}], "chosen": "Wear a helmet.",
                      "rejected": "Be careless."},
}


@pytest.mark.parametrize("fmt", sorted(RAW))
def test_tfds_builder_converts_public_formats_to_array_record(tmp_path, fmt):
    raw = tmp_path / "raw"
    raw.mkdir()
    with gzip.open(raw / "train.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in RAW[fmt]))
    build(fmt, str(raw), str(tmp_path / "tfds"))
    assert list((tmp_path / "tfds" / "preference_pairs" / fmt / "1.0.0").glob("*.array_record*"))
    records = read_tfds(f"preference_pairs/{fmt}", "train", str(tmp_path / "tfds"))
    assert records.rows == [EXPECTED[fmt]]  # the UltraFeedback tie is skipped (and logged by the builder)


def test_tfds_builder_names_the_malformed_line(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.jsonl").write_text(json.dumps(RAW["pku_safe_rlhf"][0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(RecordError, match=r"train.jsonl:2: missing field 'better_response_id' for format 'pku_safe_rlhf'"):
        build("pku_safe_rlhf", str(raw), str(tmp_path / "tfds"))


def test_missing_tfds_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="build it first"):
        read_tfds("preference_pairs/hh_rlhf", "train", str(tmp_path))


def test_encoded_pairs_mask_exactly_the_response_and_left_pad_prompts(tiny_checkpoint):
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    rows = synthetic_pairs(3)
    arrays = encode_preference(Records(rows), tokenizer, max_prompt_length=40, max_length=48).arrays
    for i, row in enumerate(rows):
        response = arrays["chosen_input_ids"][i][arrays["chosen_loss_mask"][i] == 1]
        assert tokenizer.decode(response, skip_special_tokens=False) == row["chosen"] + "<|im_end|>"
        prompt = arrays["prompt_ids"][i][arrays["prompt_mask"][i] == 1]
        assert tokenizer.decode(prompt) == row["prompt"] and arrays["prompt_mask"][i, -1] == 1


def test_too_long_rows_raise_or_are_skipped_and_counted(tiny_checkpoint):
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    rows = [{"prompt": "hi", "response": "ok"}, {"prompt": "long " * 40, "response": "ok"}]
    with pytest.raises(TruncationError, match="record 1: .*data.on_error=skip"):
        encode_sft(Records(rows), tokenizer, max_prompt_length=64, max_length=8)
    enc = encode_sft(Records(rows), tokenizer, max_prompt_length=64, max_length=8, on_error="skip")
    assert len(enc) == 1 and enc.skipped == 1


def test_train_iterator_resumes_from_its_saved_state_and_splits_processes():
    arrays = {"x": np.arange(20), "valid": np.ones(20, np.int32)}
    it = train_iterator(arrays, 4, seed=3)
    for _ in range(7):  # past one epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = [next(it)["x"] for _ in range(5)]
    again = train_iterator(arrays, 4, seed=3)
    again.set_state(state)
    assert all(np.array_equal(next(again)["x"], e) for e in expected)
    # Two processes hold the two halves of the single-process global batch, batch after batch.
    single, halves = train_iterator(arrays, 4, seed=0), [train_iterator(arrays, 2, seed=0, process_index=p,
                                                                        process_count=2) for p in range(2)]
    for _ in range(6):
        np.testing.assert_array_equal(np.concatenate([next(h)["x"] for h in halves]), next(single)["x"])


def test_eval_batches_cover_every_row_once_with_padding_marked_invalid():
    arrays = {"x": np.arange(10), "valid": np.ones(10, np.int32)}
    batches = eval_batches(arrays, 4)
    assert len(batches) == 3
    assert sorted(np.concatenate([b["x"][b["valid"] == 1] for b in batches]).tolist()) == list(range(10))
    assert batches[-1]["valid"].tolist() == [1, 1, 0, 0]
