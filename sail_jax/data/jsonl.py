"""Preference records from JSONL: one ``{"prompt", "chosen", "rejected"}`` object per line.

Fields are strings, or message lists (``[{"role": ..., "content": ...}]``) for conversational data.
A malformed line is an error naming the file, the line and the fix; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

FIELDS = ("prompt", "chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    prompt: Any
    chosen: Any
    rejected: Any


def _valid_text(value) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def parse_preference(obj: Any, where: str) -> PreferenceRecord:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with fields {list(FIELDS)}, got {type(obj).__name__}")
    missing = [f for f in FIELDS if f not in obj]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; each record needs {list(FIELDS)}")
    for field in FIELDS:
        if not _valid_text(obj[field]):
            raise ValueError(
                f"{where}: field {field!r} must be a string or a list of {{'role', 'content'}} messages"
            )
    return PreferenceRecord(obj["prompt"], obj["chosen"], obj["rejected"])


def read_preference_jsonl(path: str) -> list[PreferenceRecord]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            records.append(parse_preference(obj, where))
    if not records:
        raise ValueError(f"{path}: no records (expected one JSON object per line)")
    return records
