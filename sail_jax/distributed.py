"""Multi-process runs: JAX's multi-controller runtime, one process per host (or several per machine).

Every process runs the same program on its own slice of each global batch; ``jax.distributed``
connects them so meshes span all devices of all processes. Started from the CLI:

  * explicitly (GPU clusters, tests): ``--coordinator=HOST:PORT --num_processes=N --process_id=I``
  * on a multi-host Cloud TPU slice: ``--multihost`` (JAX reads the topology from the TPU runtime).

CPU devices talk through gloo, so the same code path runs (and is tested) on a laptop.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1, multihost: bool = False) -> bool:
    """Join the process group when asked to; returns whether this run is multi-process."""
    explicit = bool(coordinator) or num_processes > 0 or process_id >= 0
    if explicit and not (coordinator and num_processes > 0 and 0 <= process_id < num_processes):
        raise ValueError(
            f"multi-process flags are incomplete: --coordinator={coordinator!r} --num_processes={num_processes} "
            f"--process_id={process_id}; give all three (HOST:PORT, N >= 1, 0 <= I < N), or none")
    if not (explicit or multihost):
        return False
    # Only the CPU backend reads this; accelerators use their own collectives (NCCL, ICI).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    return jax.process_count() > 1


def is_main() -> bool:
    """Process 0 writes logs, summaries and exports; every process computes."""
    return jax.process_index() == 0


def from_main(value: int) -> int:
    """Process 0's ``value`` on every process (a collective in multi-process runs)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def global_array(x, sharding):
    """A host array that every process holds in full, placed as one global array with ``sharding``
    (each process fills the shards of its own devices)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x):
    """A global array as one numpy array on every process (a collective: all processes must call it)."""
    if getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False):
        return jax.device_get(x)
    return multihost_utils.process_allgather(x, tiled=True)
