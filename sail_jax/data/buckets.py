"""Length buckets: a batch is cut to the smallest bucket that holds its longest row before it meets a
jitted function, so a step pays for the tokens the batch has, not for ``data.max_length``.

Host arrays stay padded to the caps (rows index-aligned, so cached reference log-probs ride along and
resume is exact); only the batch handed to the device is cut. Padding carries no information (every
position is masked, and positions come from the mask), so a cut batch gives the padded batch's losses.
jit compiles once per distinct shape: buckets keep that to a handful, and ``ShapeLog`` counts them.

Arrays that share a width are cut together (a group): chosen and rejected rows are concatenated into
one forward pass, so they share one width; left-padded prompts are cut on the left.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from sail_jax.errors import UserError

BUCKETINGS = ("pow2_half", "pow2", "none", "a positive integer N (multiples of N)")
# The config keys that choose the buckets: they cut padding, so they change float rounding, not a run.
CONFIG_KEYS = ("data.buckets", "data.bucket_min")


@dataclasses.dataclass(frozen=True)
class Group:
    side: str  # where the padding is: "right" or "left"
    masks: tuple[str, ...]  # 1 on real positions; the group's width is the longest row of any of them
    fields: tuple[str, ...]  # cut with them (the masks included)


_PAIR = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "loss_mask"))
_RESPONSES = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in ("response", "response_mask"))
GROUPS = (
    Group("right", ("attention_mask",), ("input_ids", "attention_mask", "loss_mask")),  # SFT rows
    Group("right", ("chosen_attention_mask", "rejected_attention_mask"), _PAIR),  # offline pairs
    Group("left", ("prompt_mask",), ("prompt_ids", "prompt_mask")),  # prompts (sampling, the online loop)
    Group("right", ("chosen_response_mask", "rejected_response_mask"),  # the online loop's responses
          _RESPONSES + ("ref_chosen_token_logps",)),
)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """``kind``: ``pow2_half`` (powers of two and the points halfway between: 16, 24, 32, 48, 64, 96,
    ...; at most a third of a row is padding, twice the shapes of ``pow2``), ``pow2`` (powers of two: up to
    half padding), ``multiple`` (multiples of ``step``) or ``none`` (always the cap); no bucket is under
    ``minimum`` or over the cap."""

    kind: str = "pow2_half"
    step: int = 0
    minimum: int = 16

    @classmethod
    def parse(cls, spec, minimum: int = 16) -> "Buckets":
        """From ``data.buckets`` (``pow2_half``, ``pow2``, ``none`` or an integer N) and ``data.bucket_min``."""
        text = str(spec).strip()
        if int(minimum) < 1:
            raise UserError(f"config.data.bucket_min={minimum}: must be >= 1")
        if text in ("pow2_half", "pow2", "none"):
            return cls(text, 0, int(minimum))
        if text.isdigit() and int(text) > 0:
            return cls("multiple", int(text), int(minimum))
        raise UserError(f"config.data.buckets={spec!r}: valid: {', '.join(BUCKETINGS)}")

    @classmethod
    def from_config(cls, data_cfg) -> "Buckets":
        return cls.parse(data_cfg.get("buckets", cls.kind), data_cfg.get("bucket_min", cls.minimum))

    def length(self, n: int, cap: int) -> int:
        """The smallest bucket that holds ``n`` positions, never over ``cap``."""
        if self.kind == "none":
            return cap
        n = max(int(n), self.minimum, 1)
        if self.kind in ("pow2", "pow2_half"):
            b = 1 << (n - 1).bit_length()
            if self.kind == "pow2_half" and b >= 4 and 3 * b // 4 >= n:
                b = 3 * b // 4
        else:
            b = -(-n // self.step) * self.step
        return min(b, cap)


NO_BUCKETS = Buckets("none")


def _real_length(mask: np.ndarray, side: str) -> int:
    """Positions from the padded side's far end to its last real one, over all rows (0 if none)."""
    cols = np.flatnonzero(np.asarray(mask).reshape(-1, mask.shape[-1]).any(axis=0))
    if not len(cols):
        return 0
    return int(cols[-1] + 1) if side == "right" else int(mask.shape[-1] - cols[0])


def widths(batch: Mapping[str, np.ndarray], buckets: Buckets) -> dict[int, int]:
    """``{group index: width}`` for each group the batch has."""
    out = {}
    for i, group in enumerate(GROUPS):
        masks = [batch[m] for m in group.masks if m in batch]
        if not masks:
            continue
        cap = masks[0].shape[-1]
        out[i] = buckets.length(max(_real_length(m, group.side) for m in masks), cap)
    return out


def row_lengths(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Real tokens of each row ``[n]``: per group its longest mask, summed over groups (what
    ``group_by_length`` sorts by)."""
    n = len(arrays["valid"])
    total = np.zeros(n, np.int64)
    for group in GROUPS:
        masks = [np.asarray(arrays[m]).reshape(n, -1).sum(-1) for m in group.masks if m in arrays]
        if masks:
            total += np.max(masks, axis=0)
    return total


def cut(batch: Mapping[str, np.ndarray], group_widths: Mapping[int, int]) -> dict[str, np.ndarray]:
    """The batch with each group's fields cut to its width (other fields as they are)."""
    out = dict(batch)
    for i, width in group_widths.items():
        group = GROUPS[i]
        for name in group.fields:
            if name in out:
                x = out[name]
                out[name] = x[..., :width] if group.side == "right" else x[..., x.shape[-1] - width:]
    return out


def trim(batch: Mapping[str, np.ndarray], buckets: Buckets) -> dict[str, np.ndarray]:
    """The batch cut to the smallest buckets that hold its longest rows (group by group)."""
    return cut(batch, widths(batch, buckets))


def pad_right(x: np.ndarray, width: int, value=0) -> np.ndarray:
    """``x [..., w]`` right-padded (or cut) to ``width``."""
    if x.shape[-1] >= width:
        return x[..., :width]
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])], constant_values=value)


class ShapeLog:
    """The distinct batch shapes a jitted step has seen (each one is a compile), and how much of each
    batch is padding: ``metrics(batch)`` gives ``batch/shapes`` and ``batch/pad_fraction`` for the logs."""

    def __init__(self):
        self.seen: set = set()

    def metrics(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        self.seen.add(tuple(sorted((k, tuple(np.shape(v))) for k, v in batch.items())))
        out = {"batch/shapes": float(len(self.seen))}
        masks = [batch[m] for g in GROUPS for m in g.masks if m in batch]
        if "packed_segment_ids" in batch:  # packed rows (sail_jax.data.packing): segment 0 is padding
            masks.append(batch["packed_segment_ids"] > 0)
        if masks and all(isinstance(m, np.ndarray) for m in masks):  # host batches (device ones stay put)
            out["batch/pad_fraction"] = 1.0 - sum(float(m.sum()) for m in masks) / sum(m.size for m in masks)
        return out
