"""Preference, SFT and prompt sets from the Hugging Face Hub (``data.source=hf``), in TRL's formats.

``data.hf_name`` is a Hub dataset id (``org/name``, ``@revision`` to pin), a local folder of data files
(a Hub repo's layout: parquet / JSON lines / CSV, splits by file name or README configs), a folder
written by ``Dataset.save_to_disk``, or ``gs://`` to either. A Hub id is fetched like a model
(``sail_jax.locations``: its cache, ``HF_HUB_OFFLINE``, the token) and then read as a local folder, so
a machine that downloaded a dataset once reads it offline.

TRL's formats are read as they are: standard (``prompt``/``chosen``/``rejected`` strings),
conversational (message lists), and the implicit prompt (``chosen``/``rejected`` whole conversations,
no ``prompt``: the messages they share are the prompt). ``data.hf_columns`` maps other column names,
e.g. ``"prompt=question,chosen=response_j,rejected=response_k"``.
"""

from __future__ import annotations

import os

from sail_jax.data.records import KIND_FIELDS, RecordError, Records, collect
from sail_jax.errors import UserError
from sail_jax.locations import local_folder

# What a dataset repo's data is stored as (its other files, e.g. images, are not fetched).
DATA_FILES = ("*.parquet", "*.arrow", "*.json", "*.jsonl", "*.json.gz", "*.jsonl.gz", "*.csv", "README.md")


def parse_columns(spec: str) -> dict[str, str]:
    """``"prompt=question,chosen=response_j"`` -> ``{"question": "prompt", "response_j": "chosen"}``."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        field, sep, column = (s.strip() for s in part.partition("="))
        if not sep or not field or not column:
            raise UserError(f"config.data.hf_columns: {part!r} is not field=column (e.g. "
                            "'prompt=question,chosen=response_j,rejected=response_k')")
        mapping[column] = field
    return mapping


def load_split(name: str, split: str, subset: str = ""):
    """The ``datasets.Dataset`` of ``split``; a missing split or unreadable folder is one line naming it."""
    import datasets

    folder = local_folder(name, key="data.hf_name", patterns=DATA_FILES, repo_type="dataset")
    try:
        if any(os.path.exists(os.path.join(folder, f)) for f in ("dataset_dict.json", "state.json")):
            saved = datasets.load_from_disk(folder)  # save_to_disk's layout
            if isinstance(saved, datasets.DatasetDict) and split not in saved:
                raise ValueError(f'Unknown split "{split}". Should be one of {list(saved)}.')
            return saved[split] if isinstance(saved, datasets.DatasetDict) else saved
        return datasets.load_dataset(folder, name=subset or None, split=split)
    except (ValueError, FileNotFoundError) as e:  # datasets' own errors for splits, subsets and empty folders
        hint = "; set data.train_split / data.eval_split to one it has" if "split" in str(e).lower() else ""
        raise UserError(f"config.data.hf_name={name!r}: {str(e).strip().splitlines()[0]}{hint}") from None


def _implicit_prompt(row: dict) -> dict:
    """TRL's implicit prompt: whole conversations in chosen/rejected; the shared messages are the prompt."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if "prompt" in row or not (isinstance(chosen, list) and isinstance(rejected, list)):
        return row
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return {**row, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def read_hf(name: str, split: str, *, subset: str = "", columns: str = "", kind: str = "preference",
            on_error: str = "raise") -> Records:
    """Records of one split; a row that does not fit ``kind`` names its index (``on_error`` as everywhere)."""
    rename = parse_columns(columns)
    data = load_split(name, split, subset)
    available = set(data.column_names)
    missing = [c for c in rename if c not in available]
    if missing:
        raise UserError(f"config.data.hf_columns names column(s) {missing} that {name!r} [{split}] does not have; "
                        f"it has {sorted(available)}")
    if not len(data):
        raise RecordError(f"{name} [{split}]: the split has no rows")

    def rows():
        for i, row in enumerate(data):
            row = {rename.get(k, k): v for k, v in row.items()}
            if kind == "preference":
                row = _implicit_prompt(row)
            yield f"{name}[{split}][{i}]", row

    records = collect(rows(), kind, on_error)
    if not records.rows:
        raise RecordError(f"{name} [{split}]: no usable records (a {kind} record needs {list(KIND_FIELDS[kind])}; "
                          f"columns: {sorted(available)}; map others with data.hf_columns); the first: "
                          f"{records.first_error}")
    return records
