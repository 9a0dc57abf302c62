"""TFDS builders that turn public preference dumps, downloaded by hand, into ``array_record`` datasets.

No TensorFlow needed: the builders write ``array_record`` files and are read with
``tfds.data_source`` (random access, what grain wants). Put the raw files in a folder and build:

    builder = PreferencePairs(config="hh_rlhf", data_dir="~/tensorflow_datasets")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="~/raw/hh"))

Raw files are ``<split>.jsonl`` or ``<split>.jsonl.gz`` (``train``, ``test``) in these formats:

  hh_rlhf              Anthropic HH-RLHF: ``chosen``/``rejected`` transcripts ("\\n\\nHuman: …\\n\\nAssistant: …")
  ultrafeedback        openbmb/UltraFeedback: ``instruction`` + ``completions[{response, overall_score}]``;
                       chosen = best, rejected = worst (rows whose scores all tie are skipped and counted)
  pku_safe_rlhf        PKU-Alignment/PKU-SafeRLHF: ``prompt``, ``response_0/1``, ``better_response_id``
  pku_safe_rlhf_safer  the same pairs labelled by ``safer_response_id``
  jsonl                sail-jax's own ``{prompt, chosen, rejected}`` rows

Each example stores ``prompt``, ``chosen``, ``rejected`` as JSON text (a string or a message list).
"""

from __future__ import annotations

import gzip
import json
import os
import re

import tensorflow_datasets as tfds
from absl import logging

from sail_jax.data.records import RecordError, Records, collect

SPLITS = ("train", "test")
FORMATS = ("hh_rlhf", "ultrafeedback", "pku_safe_rlhf", "pku_safe_rlhf_safer", "jsonl")
_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_messages(transcript: str, where: str) -> list[dict[str, str]]:
    parts = _TURN.split("\n\n" + transcript.lstrip("\n"))  # every turn, the first included, after "\n\n"
    if len(parts) < 3 or parts[0].strip():
        raise RecordError(f"{where}: not an HH-RLHF transcript (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def convert_row(fmt: str, obj: dict, where: str) -> dict | None:
    """One raw row -> ``{prompt, chosen, rejected}``; ``None`` for a row with no preference (a tie)."""
    try:
        if fmt == "hh_rlhf":
            chosen, rejected = _hh_messages(obj["chosen"], where), _hh_messages(obj["rejected"], where)
            if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
                raise RecordError(f"{where}: the last turn must be the Assistant's")
            if chosen[:-1] != rejected[:-1]:
                raise RecordError(f"{where}: chosen and rejected transcripts differ before the last turn")
            return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}
        if fmt == "ultrafeedback":
            scored = [(float(c["overall_score"]), c["response"]) for c in obj["completions"]]
            if len(scored) < 2:
                raise RecordError(f"{where}: needs at least two completions")
            best, worst = max(scored, key=lambda s: s[0]), min(scored, key=lambda s: s[0])
            if best[0] == worst[0]:
                return None
            return {"prompt": [{"role": "user", "content": obj["instruction"]}], "chosen": best[1], "rejected": worst[1]}
        if fmt in ("pku_safe_rlhf", "pku_safe_rlhf_safer"):
            key = "better_response_id" if fmt == "pku_safe_rlhf" else "safer_response_id"
            win = int(obj[key])
            if win not in (0, 1):
                raise RecordError(f"{where}: {key} must be 0 or 1, got {win}")
            return {"prompt": [{"role": "user", "content": obj["prompt"]}], "chosen": obj[f"response_{win}"],
                    "rejected": obj[f"response_{1 - win}"]}
        return {k: obj[k] for k in ("prompt", "chosen", "rejected")}
    except KeyError as e:
        raise RecordError(f"{where}: missing field {e.args[0]!r} for format {fmt!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, RecordError):
            raise
        raise RecordError(f"{where}: malformed {fmt!r} row ({e})") from None


def _raw_file(folder: str, split: str) -> str | None:
    for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def read_raw(path: str, fmt: str) -> tuple[list[dict], int]:
    """Convert a raw file; malformed rows raise with file:line, ties are counted and returned."""
    opener = gzip.open if path.endswith(".gz") else open
    rows, ties = [], 0
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            row = convert_row(fmt, obj, where)
            if row is None:
                ties += 1
            else:
                rows.append((where, row))
    parsed = collect(rows, "preference")  # validates text fields with the same rules as JSONL
    return parsed.rows, ties


class PreferencePairs(tfds.core.GeneratorBasedBuilder):
    """Preference pairs from a local dump of a public dataset (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=fmt) for fmt in FORMATS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put <split>.jsonl or <split>.jsonl.gz files (train, test) in the manual_dir."

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")  # the only format that works without TensorFlow
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"prompt": text, "chosen": text, "rejected": text}),
            description=f"Preference pairs converted from the {self.builder_config.name!r} format.",
        )

    def _split_generators(self, dl_manager):
        folder = os.fspath(dl_manager.manual_dir)
        found = {s: _raw_file(folder, s) for s in SPLITS}
        if not any(found.values()):
            raise FileNotFoundError(f"{folder}: no train.jsonl[.gz] or test.jsonl[.gz]; "
                                    f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return {s: self._generate_examples(p) for s, p in found.items() if p}

    def _generate_examples(self, path):
        rows, ties = read_raw(path, self.builder_config.name)
        if ties:
            logging.warning("%s: %d rows have no preference (all scores tie) and were skipped", path, ties)
        for i, row in enumerate(rows):
            yield i, {k: json.dumps(row[k]) for k in ("prompt", "chosen", "rejected")}


def build(fmt: str, raw_dir: str, data_dir: str) -> None:
    """Convert the raw files in ``raw_dir`` into ``data_dir/preference_pairs/<fmt>``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown preference format {fmt!r}; valid: {list(FORMATS)}")
    builder = PreferencePairs(config=fmt, data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=raw_dir))


def read_tfds(name: str, split: str, data_dir: str, kind: str = "preference", on_error: str = "raise") -> Records:
    """Records of a built TFDS dataset (``name`` like ``preference_pairs/hh_rlhf``), via ``tfds.data_source``."""
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for a dataset that was never built
        raise FileNotFoundError(f"TFDS dataset {name!r} split {split!r} not found under {data_dir!r} ({e}); "
                                f"build it first (sail_jax.data.tfds_builders.build)") from None
    if not hasattr(source, "__len__") or len(source) == 0:
        raise FileNotFoundError(f"TFDS dataset {name!r} split {split!r} under {data_dir!r} is empty or missing")

    def rows():
        for i in range(len(source)):
            ex = source[i]
            yield f"{name}[{split}][{i}]", {k: json.loads(_text(v)) for k, v in ex.items()}

    return collect(rows(), kind, on_error)


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)
