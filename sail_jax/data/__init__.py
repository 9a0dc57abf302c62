"""Datasets: preference and prompt records from JSONL (TFDS builders and grain loading build on these)."""

from sail_jax.data.jsonl import PreferenceRecord, read_preference_jsonl

__all__ = ["PreferenceRecord", "read_preference_jsonl"]
