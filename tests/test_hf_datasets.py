"""data.source=hf: TRL's preference formats read from a Hub dataset (offline, from the Hugging Face cache
in huggingface_hub's layout), a folder of data files, and a save_to_disk folder; bad input is one line."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import hub_cache
from sail_jax.data.hf_datasets import read_hf
from sail_jax.errors import UserError

STANDARD = {"prompt": ["What is 2+2?", "Name a colour."], "chosen": ["4", "Blue."], "rejected": ["5", "Seven."]}
USER = [{"role": "user", "content": "Hi?"}]
CONVERSATIONAL = {  # TRL's implicit prompt: whole conversations, the shared messages are the prompt
    "chosen": [USER + [{"role": "assistant", "content": "Hello!"}]],
    "rejected": [USER + [{"role": "assistant", "content": "Go away."}]],
}


def write_repo(folder, splits: dict[str, dict]) -> str:
    """A dataset repo's layout: data/<split>-00000-of-00001.parquet per split."""
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    for split, columns in splits.items():
        pq.write_table(pa.table(columns), os.path.join(folder, "data", f"{split}-00000-of-00001.parquet"))
    return str(folder)


def test_a_hub_dataset_reads_offline_from_the_cache(tmp_path, offline_hub):
    hub_cache(offline_hub, "someorg/prefs", write_repo(tmp_path / "repo", {"train": STANDARD, "test": STANDARD}),
              repo_type="dataset")
    records = read_hf("someorg/prefs", "train")
    assert records.rows == [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in
                            zip(STANDARD["prompt"], STANDARD["chosen"], STANDARD["rejected"])]
    assert records.where == ["someorg/prefs[train][0]", "someorg/prefs[train][1]"]
    assert len(read_hf("someorg/prefs", "test", kind="prompt").rows) == 2
    with pytest.raises(UserError, match=r"^config.data.hf_name='someorg/prefs': Unknown split \"validation\". "
                                        r"Should be one of \['train', 'test'\].*set data.train_split"):
        read_hf("someorg/prefs", "validation")
    with pytest.raises(UserError, match="as a Hub id it is not in the Hugging Face cache .* --repo-type dataset"):
        read_hf("someorg/absent", "train")


def test_conversational_implicit_prompt_and_column_mapping(tmp_path):
    convo = read_hf(write_repo(tmp_path / "c", {"train": CONVERSATIONAL}), "train").rows[0]
    assert convo == {"prompt": USER, "chosen": [{"role": "assistant", "content": "Hello!"}],
                     "rejected": [{"role": "assistant", "content": "Go away."}]}
    renamed = write_repo(tmp_path / "se", {"train": {"question": ["q"], "response_j": ["good"], "response_k": ["bad"]}})
    rows = read_hf(renamed, "train", columns="prompt=question, chosen=response_j, rejected=response_k").rows
    assert rows == [{"prompt": "q", "chosen": "good", "rejected": "bad"}]
    with pytest.raises(UserError, match=r"hf_columns names column\(s\) \['answer'\] that .* does not have; it has "
                                        r"\['question', 'response_j', 'response_k'\]"):
        read_hf(renamed, "train", columns="chosen=answer")
    with pytest.raises(UserError, match=r"'chosen' is not field=column"):
        read_hf(renamed, "train", columns="chosen")
    with pytest.raises(UserError, match=r"\[train\]\[0\]: missing field\(s\) \['prompt', 'chosen', 'rejected'\]"):
        read_hf(renamed, "train")  # unmapped: names the row


def test_a_save_to_disk_folder(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict(STANDARD)}).save_to_disk(str(tmp_path / "saved"))
    assert len(read_hf(str(tmp_path / "saved"), "train").rows) == 2
    with pytest.raises(UserError, match=r"Unknown split \"test\". Should be one of \['train'\]"):
        read_hf(str(tmp_path / "saved"), "test")


def test_validation_names_the_dataset_key(tiny_checkpoint, tmp_path, offline_hub):
    from sail_jax.configs import base_config
    from sail_jax.validation import ConfigError, validate_config

    config = base_config("dpo")
    config.model.path = tiny_checkpoint
    config.data.update(source="hf", hf_name="someorg/none")
    with pytest.raises(ConfigError, match=r"^config.data.hf_name='someorg/none': no local folder of that name"):
        validate_config(config)
    config.data.hf_name = ""
    with pytest.raises(ConfigError, match=r"^config.data.hf_name is empty"):
        validate_config(config)
    config.data.update(hf_name=write_repo(tmp_path / "r", {"train": STANDARD}), eval_split="")
    validate_config(config)
