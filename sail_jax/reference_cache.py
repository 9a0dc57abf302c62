"""``reference.precompute``: the frozen reference's log-probs of every dataset pair, computed once and
cached in the workdir, so training steps (offline DPO) and the online loop's labelling (SAIL's
offline and DP rows) read them from the batch instead of running the reference over the pairs again.

Valid only while the reference never changes (no ``reference.sync_every``), on one process.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np

from sail_jax.data.buckets import NO_BUCKETS, Buckets
from sail_jax.data.pipeline import eval_batches
from sail_jax.progress import bar
from sail_jax.sharding import shard_batch

KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def attach_reference_logps(arrays: dict[str, np.ndarray], logps: Callable, *, batch_size: int, mesh,
                           cache_path: str, desc: str, buckets: Buckets = NO_BUCKETS) -> None:
    """Adds ``ref_chosen_logps``/``ref_rejected_logps`` ``[n]`` to ``arrays``: read from ``cache_path``
    when it holds as many rows, else computed with ``logps(batch) -> (chosen, rejected)`` (jitted, on
    ``mesh``) over every row in order, in batches cut to ``buckets``, and written there (by process 0)."""
    n = len(arrays["valid"])
    if os.path.exists(cache_path):
        with np.load(cache_path) as f:
            if len(f["chosen"]) == n:
                arrays[KEYS[0]], arrays[KEYS[1]] = f["chosen"], f["rejected"]
                return
    chosen, rejected = [], []
    for batch in bar(eval_batches(arrays, batch_size, buckets=buckets), desc):
        c, r = logps(shard_batch(batch, mesh))
        chosen.append(np.asarray(c))
        rejected.append(np.asarray(r))
    arrays[KEYS[0]], arrays[KEYS[1]] = np.concatenate(chosen)[:n], np.concatenate(rejected)[:n]
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
        np.savez(cache_path, chosen=arrays[KEYS[0]], rejected=arrays[KEYS[1]])
