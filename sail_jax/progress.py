"""What a run says while it works: one line per phase, and a bar where a phase loops.

Process 0 speaks (stderr, so a run's stdout stays its summary); other processes stay quiet.
"""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

import jax
from tqdm import tqdm

T = TypeVar("T")


def say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def bar(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """``items`` with a progress bar (one that loops once shows no bar)."""
    total = total if total is not None else len(items) if hasattr(items, "__len__") else None
    if total is not None and total <= 1:
        return items
    return tqdm(items, desc=desc, total=total, disable=jax.process_index() != 0, dynamic_ncols=True, leave=False)
