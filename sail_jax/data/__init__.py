"""Datasets: records from JSONL files or TFDS builders, tokenized into fixed-shape arrays and served
by grain with a checkpointable iterator."""

from sail_jax.data.records import KIND_FIELDS, RecordError, Records, parse_record, read_jsonl

__all__ = ["KIND_FIELDS", "RecordError", "Records", "parse_record", "read_jsonl"]
