"""Padding-free packing (``data.packing``): a batch's sequences packed into a few rows, several per row.

A right-padded batch pays for ``rows x longest row``; packed, it pays for about the tokens it has.
Sequences are placed first-fit in decreasing length into rows as wide as the bucket of the longest
one; ``segment_ids`` (1, 2, ... per row, 0 on padding) make the model restart positions at each
sequence and keep attention inside it (``Transformer(segment_ids=...)``), and ``packed_sequence``
says which sequence each token belongs to, so the per-sequence sums a loss needs are segment sums.

Packed fields: ``packed_input_ids``, ``packed_segment_ids``, ``packed_loss_mask``,
``packed_sequence`` (the sequence's index; ``n`` on padding), all ``[rows, width]``. An SFT batch's
sequences are its rows; a preference batch's are its chosen rows, then its rejected rows (``2b``).
The per-example fields (``valid``, cached reference log-probs) stay as they were.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from sail_jax.data.buckets import Buckets

_SOURCES = {"sft": ("",), "preference": ("chosen_", "rejected_")}


def _layout(batch: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    if "chosen_input_ids" in batch:
        return _SOURCES["preference"]
    if "input_ids" in batch:
        return _SOURCES["sft"]
    raise ValueError(f"packing needs SFT rows (input_ids) or preference rows (chosen_/rejected_input_ids); got "
                     f"{sorted(batch)}")


def pack(batch: Mapping[str, np.ndarray], buckets: Buckets, *, row_multiple: int = 1) -> dict[str, np.ndarray]:
    """The batch with its right-padded sequence rows replaced by packed rows (a multiple of
    ``row_multiple``, so they split over the data-parallel devices)."""
    prefixes = _layout(batch)
    ids = np.concatenate([batch[f"{p}input_ids"] for p in prefixes])
    attention = np.concatenate([batch[f"{p}attention_mask"] for p in prefixes])
    loss = np.concatenate([batch[f"{p}loss_mask"] for p in prefixes])
    lengths = attention.sum(1).astype(np.int64)
    n, cap = ids.shape
    width = buckets.length(int(lengths.max()), cap) if n else cap
    right_padded = np.array_equal(attention != 0, np.arange(cap)[None, :] < lengths[:, None])
    if not right_padded or np.any(loss[:, 0]):  # a sequence's first token is predicted by nothing in it
        raise ValueError("packing needs right-padded rows whose first token is not a loss token")
    free: list[int] = []  # room left in each row
    place = np.zeros((n, 2), np.int64)  # (row, offset) of each sequence
    for i in sorted(range(n), key=lambda i: -lengths[i]):
        if lengths[i] == 0:  # an empty row (eval padding): nothing to place
            continue
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            row = len(free)
            free.append(width)
        place[i] = (row, width - free[row])
        free[row] -= lengths[i]
    rows = max(-(-max(len(free), 1) // row_multiple) * row_multiple, row_multiple)
    replaced = {f"{p}{f}" for p in prefixes for f in ("input_ids", "attention_mask", "loss_mask")}
    out = {k: v for k, v in batch.items() if k not in replaced}
    out["packed_input_ids"] = np.zeros((rows, width), ids.dtype)
    out["packed_segment_ids"] = np.zeros((rows, width), np.int32)
    out["packed_loss_mask"] = np.zeros((rows, width), loss.dtype)
    out["packed_sequence"] = np.full((rows, width), n, np.int32)
    segments = np.zeros(rows, np.int32)
    for i in np.flatnonzero(lengths):
        (row, at), k = place[i], lengths[i]
        segments[row] += 1
        out["packed_input_ids"][row, at:at + k] = ids[i, :k]
        out["packed_segment_ids"][row, at:at + k] = segments[row]
        out["packed_loss_mask"][row, at:at + k] = loss[i, :k]
        out["packed_sequence"][row, at:at + k] = i
    return out


def is_packed(batch) -> bool:
    return "packed_input_ids" in batch


def packed_sequence_sums(per_token: jax.Array, batch, num_sequences: int) -> jax.Array:
    """``[num_sequences]``: the sum of ``per_token [rows, width - 1]`` (aligned with tokens 1..) over
    each sequence's tokens."""
    index = batch["packed_sequence"][:, 1:].reshape(-1)
    return jax.ops.segment_sum(per_token.reshape(-1), index, num_segments=num_sequences + 1)[:num_sequences]


def packed_logits(model, batch) -> jax.Array:
    return model(batch["packed_input_ids"], segment_ids=batch["packed_segment_ids"])
