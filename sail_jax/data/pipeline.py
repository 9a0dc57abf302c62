"""From records to fixed-shape batches: tokenization, padding, and grain iterators that checkpoint.

Records are tokenized once, up front, into numpy arrays (static shapes: one compile per run, and
index-aligned rows, so cached reference log-probs can ride along). grain serves them shuffled,
sliced per process, with an iterator whose position is saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from absl import logging

from sail_jax.data.buckets import NO_BUCKETS, Buckets, cut, row_lengths, trim, widths
from sail_jax.data.packing import pack
from sail_jax.data.records import Records, read_jsonl
from sail_jax.errors import UserError
from sail_jax.tokenization import Tokenizer, TruncationError, pack_pairs, pad_left, require_fits

SOURCES = ("jsonl", "tfds", "hf")


def has_eval_set(data) -> bool:
    """Whether the config names held-out records: a JSONL eval_path, or an eval_split of TFDS / HF."""
    return bool(data.eval_path if data.get("source", "jsonl") == "jsonl" else data.get("eval_split", ""))


def load_records(data_cfg, split: str, kind: str) -> Records:
    """Records of ``split`` ("train" or "eval") from the source the config names; logs skips."""
    source, on_error = data_cfg.source, data_cfg.get("on_error", "raise")
    if source == "jsonl":
        path = data_cfg.train_path if split == "train" else data_cfg.eval_path
        if not path:
            raise UserError(f"config.data.{split}_path is empty: set it to a JSONL file of {kind} records")
        records = read_jsonl(path, kind, on_error)
    elif source == "tfds":
        from sail_jax.data.tfds_builders import read_tfds

        tfds_split = data_cfg.train_split if split == "train" else data_cfg.eval_split
        records = read_tfds(data_cfg.tfds_name, tfds_split, data_cfg.tfds_dir, kind, on_error)
    elif source == "hf":
        from sail_jax.data.hf_datasets import read_hf

        records = read_hf(data_cfg.hf_name, data_cfg.train_split if split == "train" else data_cfg.eval_split,
                          subset=data_cfg.get("hf_subset", ""), columns=data_cfg.get("hf_columns", ""), kind=kind,
                          on_error=on_error)
    else:
        raise ValueError(f"data.source: unknown source {source!r}; valid: {list(SOURCES)}")
    if records.skipped:
        logging.warning("data (%s): skipped %d malformed rows; first: %s", split, records.skipped, records.first_error)
    return records


@dataclasses.dataclass
class Encoded:
    """Tokenized rows ``{field: [n, ...]}`` and how many records could not be encoded."""

    arrays: dict[str, np.ndarray]
    skipped: int = 0

    def __len__(self):
        return len(next(iter(self.arrays.values())))


def _encode_all(records: Records, encode_one, on_error: str, dropped: list[int] | None = None) -> tuple[list[Any], int]:
    out, skipped = [], records.skipped
    for i, row in enumerate(records.rows):
        try:
            out.append(encode_one(row))
        except TruncationError as e:
            if on_error == "raise":
                raise TruncationError(f"{records.origin(i)}: {e} (or set data.on_error=skip to skip and count "
                                      "such rows)") from None
            skipped += 1
            if dropped is not None:
                dropped.append(i)
    if not out:
        raise UserError(f"no record could be encoded ({skipped} skipped); check data.max_length/max_prompt_length")
    return out, skipped


def encode_preference(records: Records, tokenizer: Tokenizer, *, max_prompt_length: int, max_length: int,
                      on_error: str = "raise", dropped: list[int] | None = None) -> Encoded:
    """``chosen_*``/``rejected_*`` (right-padded rows with loss masks), ``prompt_ids``/``prompt_mask``
    (left-padded, for sampling), and ``valid``; the indices of rows skipped as too long go to ``dropped``."""

    def one(row):
        kw = dict(max_prompt_length=max_prompt_length, max_length=max_length)
        return (tokenizer.encode_pair(row["prompt"], row["chosen"], **kw),
                tokenizer.encode_pair(row["prompt"], row["rejected"], **kw))

    pairs, skipped = _encode_all(records, one, on_error, dropped)
    arrays = {}
    for side, idx in (("chosen", 0), ("rejected", 1)):
        for k, v in pack_pairs([p[idx] for p in pairs], max_length, tokenizer.pad_id).items():
            arrays[f"{side}_{k}"] = v
    arrays["prompt_ids"], arrays["prompt_mask"] = pad_left([p[0].prompt_ids for p in pairs], max_prompt_length,
                                                           tokenizer.pad_id)
    arrays["valid"] = np.ones(len(pairs), np.int32)
    return Encoded(arrays, skipped)


def encode_sft(records: Records, tokenizer: Tokenizer, *, max_prompt_length: int, max_length: int,
               on_error: str = "raise") -> Encoded:
    """``input_ids``, ``attention_mask``, ``loss_mask`` (response tokens) and ``valid``."""
    pairs, skipped = _encode_all(records, lambda row: tokenizer.encode_pair(
        row["prompt"], row["response"], max_prompt_length=max_prompt_length, max_length=max_length), on_error)
    arrays = pack_pairs(pairs, max_length, tokenizer.pad_id)
    arrays["valid"] = np.ones(len(pairs), np.int32)
    return Encoded(arrays, skipped)


class _Rows:
    """Random-access source over index-aligned arrays (what ``grain.MapDataset.source`` takes)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __len__(self):
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.arrays.items()}


class _Ordered:
    """Rows in an endless order without grain's shuffle: the file's order (``shuffle=False``), or
    ``group_by_length``: each epoch a seeded permutation, cut into windows of ``window`` rows, each
    window sorted by length and cut into batches served in a seeded random order (transformers'
    ``group_by_length``). A pure function of the position, so grain's iterator state resumes it."""

    EPOCHS = 1 << 40  # "endless": grain needs a length

    def __init__(self, rows: _Rows, *, seed: int, lengths: np.ndarray | None, batch: int, window: int):
        self.rows, self.seed, self.lengths, self.batch, self.window = rows, seed, lengths, batch, window
        self._epoch: tuple[int, np.ndarray] | None = None

    def __len__(self):
        return len(self.rows) * self.EPOCHS

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.rows)
        if self.lengths is None:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(n)
        out = []
        for lo in range(0, n, self.window):
            idx = perm[lo:lo + self.window]
            idx = idx[np.argsort(-self.lengths[idx], kind="stable")]
            chunks = [idx[i:i + self.batch] for i in range(0, len(idx), self.batch)]
            out.extend(chunks[i] for i in rng.permutation(len(chunks)))
        return np.concatenate(out)

    def __getitem__(self, i):
        epoch, j = divmod(int(i), len(self.rows))
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.order(epoch))
        return self.rows[int(self._epoch[1][j])]


def train_iterator(arrays: dict[str, np.ndarray], batch_size: int, *, seed: int, process_index: int = 0,
                   process_count: int = 1, buckets: Buckets = NO_BUCKETS, shuffle: bool = True,
                   group_by_length: bool = False, group_window: int = 64, packing: bool = False,
                   row_multiple: int = 1):
    """Endless shuffled batches; ``batch_size`` is per process.

    Every process shuffles all rows with the same seed and keeps its own contiguous slice of each
    global batch (the rows its devices hold), so the global batches, and hence the training run,
    are the same for any number of processes. Each global batch is cut to its length ``buckets``
    before it is sliced (every process gets the same width), or with ``packing`` packed into rows
    (``sail_jax.data.packing``; a multiple of ``row_multiple``, each process keeping its share).
    ``shuffle=False`` serves the rows in order; ``group_by_length`` puts rows of similar length in a
    batch (windows of ``group_window`` batches). The returned grain iterator has
    ``get_state()``/``set_state()``: checkpoints store its position.
    """
    n = len(_Rows(arrays))
    global_batch = process_count * batch_size
    if n < global_batch:
        raise UserError(f"the training set has {n} rows, fewer than one global batch of {global_batch}; add data or "
                        "lower the batch size")
    if group_by_length and not shuffle:
        raise UserError("config.data: group_by_length=True shuffles within windows; it needs shuffle=True")
    if shuffle and not group_by_length:
        ds = grain.MapDataset.source(_Rows(arrays)).shuffle(seed=seed).repeat(None)
    else:
        lengths = row_lengths(arrays) if group_by_length else None
        ds = grain.MapDataset.source(_Ordered(_Rows(arrays), seed=seed, lengths=lengths, batch=global_batch,
                                              window=global_batch * group_window))
    ds = ds.batch(global_batch, drop_remainder=True)
    if packing:
        ds = ds.map(lambda batch: pack(batch, buckets, row_multiple=row_multiple))
    elif buckets != NO_BUCKETS:
        ds = ds.map(lambda batch: trim(batch, buckets))
    if process_count > 1:  # each field's rows (examples, or packed rows) split evenly over the processes
        def share(x):
            n = len(x) // process_count
            return x[process_index * n:(process_index + 1) * n]

        ds = ds.map(lambda batch: {k: share(v) for k, v in batch.items()})
    return iter(ds.to_iter_dataset())


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int, *, process_index: int = 0,
                 process_count: int = 1, buckets: Buckets = NO_BUCKETS) -> list[dict[str, np.ndarray]]:
    """Every row once, in order; the last batch is padded with ``valid = 0`` rows (static shapes).
    Batch i holds rows ``[i·B·P, (i+1)·B·P)`` over the P processes, and is cut to their ``buckets``."""
    n_all = len(arrays["valid"])
    per_process = -(-n_all // process_count)  # the same batch count on every process
    total = -(-per_process // batch_size) * batch_size
    rows = {k: v[process_index::process_count] for k, v in arrays.items()}
    n = len(rows["valid"])
    padded = {k: np.concatenate([v, np.zeros((total - n,) + v.shape[1:], v.dtype)]) for k, v in rows.items()}
    out = []
    for i in range(0, total, batch_size):
        batch = {k: v[i:i + batch_size] for k, v in padded.items()}
        lo = i * process_count  # the global rows of this batch, on every process
        window = {k: v[lo:lo + batch_size * process_count] for k, v in arrays.items()}
        out.append(cut(batch, widths(window, buckets)))
    return out


def encode_online(records: Records, tokenizer: Tokenizer, *, max_prompt_length: int, max_response_length: int,
                  on_error: str = "raise", prompts_only: bool = False) -> Encoded:
    """The online loop's layout: ``prompt_ids``/``prompt_mask`` left-padded to ``max_prompt_length``
    (what the sampler takes), and the dataset pair's responses right-padded to
    ``max_response_length`` (``chosen_response``/``chosen_response_mask``, same for rejected), so a
    sampled response can stand in for a dataset one row by row. ``prompts_only``: prompt records,
    no pair arrays (held-out prompts for sampling-based evaluation)."""

    def one(row):
        prompt = tokenizer.encode_prompt(row["prompt"])
        require_fits("the prompt", len(prompt), "max_prompt_length", max_prompt_length)
        sides = () if prompts_only else ("chosen", "rejected")
        responses = [tokenizer.encode_response(row["prompt"], row[side]) for side in sides]
        for side, response in zip(sides, responses):
            require_fits(f"the {side} response", len(response), "max_response_length", max_response_length)
        return prompt, responses

    dropped: list[int] = []
    rows, skipped = _encode_all(records, one, on_error, dropped)
    arrays = {}
    arrays["prompt_ids"], arrays["prompt_mask"] = pad_left([r[0] for r in rows], max_prompt_length, tokenizer.pad_id)
    for i, side in enumerate(() if prompts_only else ("chosen", "rejected")):
        ids = np.full((len(rows), max_response_length), tokenizer.pad_id, np.int32)
        mask = np.zeros((len(rows), max_response_length), np.int32)
        for j, (_, responses) in enumerate(rows):
            ids[j, :len(responses[i])] = responses[i]
            mask[j, :len(responses[i])] = 1
        arrays[f"{side}_response"], arrays[f"{side}_response_mask"] = ids, mask
    arrays["index"] = np.setdiff1d(np.arange(len(records.rows)), dropped).astype(np.int32)
    arrays["valid"] = np.ones(len(rows), np.int32)
    return Encoded(arrays, skipped)
