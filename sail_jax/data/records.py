"""Records: the rows every dataset source yields, validated in one place.

A record is a dict of text fields, each a string or a message list (``[{"role", "content"}]``,
rendered with the tokenizer's chat template). Kinds and their fields:

  preference  ``prompt``, ``chosen``, ``rejected``
  sft         ``prompt``, ``response`` (a preference row also works: its ``chosen`` is the target)
  prompt      ``prompt`` (extra fields, e.g. a dataset pair, are kept)

A malformed row is an error naming the file and line and the fix, or, with ``on_error="skip"``,
skipped and counted (the count is returned and logged): never dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable

from sail_jax.errors import UserError

KIND_FIELDS = {"preference": ("prompt", "chosen", "rejected"), "sft": ("prompt", "response"), "prompt": ("prompt",)}
ON_ERROR = ("raise", "skip")


class RecordError(UserError, ValueError):
    """A row that cannot be used, with where it came from."""


@dataclasses.dataclass
class Records:
    rows: list[dict[str, Any]]
    skipped: int = 0
    first_error: str | None = None  # the first skipped row's message, for the log
    where: list[str] = dataclasses.field(default_factory=list)  # per row: "file:line" (1-based) or its origin

    def origin(self, i: int) -> str:
        return self.where[i] if i < len(self.where) else f"record {i}"


def _valid_text(value) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value) and any(m["content"].strip() for m in value)


def check_kind(kind: str) -> tuple[str, ...]:
    if kind not in KIND_FIELDS:
        raise UserError(f"unknown record kind {kind!r}; valid: {sorted(KIND_FIELDS)}")
    return KIND_FIELDS[kind]


def parse_record(obj: Any, where: str, kind: str = "preference") -> dict[str, Any]:
    """Validate one row (a dict) of ``kind``; raises ``RecordError`` naming ``where``."""
    fields = check_kind(kind)
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object with fields {list(fields)}, got {type(obj).__name__}")
    if kind == "sft" and "response" not in obj and "chosen" in obj:
        obj = {**obj, "response": obj["chosen"]}
    missing = [f for f in fields if f not in obj]
    if missing:
        raise RecordError(f"{where}: missing field(s) {missing}; a {kind} record needs {list(fields)}")
    for field in fields:
        if not _valid_text(obj[field]):
            raise RecordError(f"{where}: field {field!r} must be a non-empty string or a list of "
                              f"{{'role', 'content'}} messages, got {str(obj[field])[:60]!r}")
    return dict(obj)


def collect(rows: Iterable[tuple[str, Any]], kind: str, on_error: str = "raise") -> Records:
    """Parse ``(where, obj)`` pairs; ``obj`` may be a ``RecordError`` raised while reading it."""
    if on_error not in ON_ERROR:
        raise UserError(f"data.on_error: unknown value {on_error!r}; valid: {list(ON_ERROR)}")
    out = Records([])
    for where, obj in rows:
        try:
            if isinstance(obj, RecordError):
                raise obj
            out.rows.append(parse_record(obj, where, kind))
            out.where.append(where)
        except RecordError as e:
            if on_error == "raise":
                raise
            out.skipped += 1
            out.first_error = out.first_error or str(e)
    return out


def _jsonl_rows(path: str):
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(line.rstrip())  # columns of the line, not of its newline
            except json.JSONDecodeError as e:
                cut = not line.rstrip().endswith("}")
                yield where, RecordError(
                    f"{where}: invalid JSON at column {e.colno}: {e.msg.removesuffix(' at')}"
                    + ("; the line ends before its object does (a record cut short, or one object split over "
                       "several lines: JSONL needs each on one line)" if cut else ""))


def read_jsonl(path: str, kind: str = "preference", on_error: str = "raise") -> Records:
    """All records of a JSONL file (one JSON object per line; blank lines ignored)."""
    records = collect(_jsonl_rows(path), kind, on_error)
    if not records.rows:
        expected = f"one JSON object per line with {list(KIND_FIELDS[kind])}"
        if not records.skipped:
            raise RecordError(f"{path}: the file has no records (expected {expected})")
        raise RecordError(f"{path}: no usable records (expected {expected}); all {records.skipped} skipped, "
                          f"the first: {records.first_error}")
    return records
