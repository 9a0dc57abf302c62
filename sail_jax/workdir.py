"""A run's workdir: who may write it (a lock), what run it holds (its identity), and whether it is done.

* **Lock.** Process 0 holds ``WORKDIR/.lock`` (an ``flock``, released by the kernel when the process
  dies) for the whole run. A second run on the same workdir fails at once, naming the holder; a lock
  file left by a dead process is taken over with a message.
* **Identity.** The resolved config is stored beside the checkpoints (``run_config.json``). Resuming
  with a config that changes the run's math fails, naming every changed key, unless the user allows
  it; cadence keys (steps, logging, evaluation, checkpoints) may change freely.
* **Done.** A finished run leaves ``summary.json`` and ``summary.txt``; the same command again
  prints the saved summary and touches nothing.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import time

from etils import epath
from ml_collections import FieldReference

from sail_jax.configs import pg_defaults
from sail_jax.data.buckets import CONFIG_KEYS
from sail_jax.errors import UserError

IDENTITY_FILE = "run_config.json"
SUMMARY_JSON, SUMMARY_TEXT = "summary.json", "summary.txt"
LOCK_FILE = ".lock"

# Keys that do not change what a run computes: how long it runs, how often it logs, evaluates and
# saves, and what it prints. A prefix ending in "." covers a whole section.
FREE_KEYS = ("steps", "log_every", "eval_every", "eval_batch_size", "checkpoint.", "export", "plan_targets",
             "model.hub_id", "sail.log_term_grads", "log_completions", "logging.", "compilation_cache",
             *CONFIG_KEYS, "data.packing",  # padding cut: the same losses, fewer FLOPs
             "generation.slots")  # continuous batching draws the same samples
# Keys added since runs were first saved whose default is not empty but still means "off".
# The ``pg`` section's options count as off while ``pg.method`` is "" (SAIL's own loss): at their defaults.
OFF_DEFAULTS = {"sail.opponent": "policy", "sail.mixture_coef": 0.5, "data.shuffle": True, "data.group_window": 64,
                **{f"pg.{key}": value for key, value in pg_defaults().items() if not isinstance(value, FieldReference)}}


class WorkdirLocked(UserError):
    pass


class ConfigChanged(UserError):
    pass


def flatten(config) -> dict[str, object]:
    """``{"optim.learning_rate": 0.0003, ...}`` with JSON values (tuples become lists)."""
    out = {}

    def walk(node, prefix):
        items = node.items() if hasattr(node, "items") else ()
        for key, value in items:
            if hasattr(value, "items"):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(config, "")
    return json.loads(json.dumps(out, default=repr, sort_keys=True))


def _free(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in FREE_KEYS)


def changed_keys(saved: dict, current: dict) -> list[str]:
    """``key: old -> new`` for every key that changes the run's math (missing keys show as <unset>). A key
    the saved run did not have yet is no change while it is off ('', None, 0, False, or its
    ``OFF_DEFAULTS`` value): options added since are off that way (``lora.quantize``, ``reward.fn``,
    ``sail.xpo_alpha``, ``sail.opponent``), so a run started before them still resumes."""
    out = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if key not in saved and (new in ("", None, 0) or OFF_DEFAULTS.get(key) == new):
            continue
        if old != new and not _free(key):
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


class Identity:
    """The run's config as stored with its checkpoints (local or ``gs://``)."""

    def __init__(self, checkpoint_dir: str):
        self.dir = epath.Path(checkpoint_dir)
        self.path = self.dir / IDENTITY_FILE

    def has_checkpoints(self) -> bool:
        return self.dir.exists() and any(p.name.isdigit() for p in self.dir.iterdir())

    def check(self, config, *, allow_change: bool) -> list[str]:
        """Raise ``ConfigChanged`` if resuming would change the run's math; returns the changes allowed."""
        if not (self.path.exists() and self.has_checkpoints()):
            return []
        saved = json.loads(self.path.read_text())
        changes = changed_keys(saved, flatten(config))
        if changes and not allow_change:
            raise ConfigChanged(
                f"{self.dir} holds checkpoints of a run with another config; resuming would change:\n  "
                + "\n  ".join(changes) + "\nUse a new --workdir (or --config.checkpoint.dir), or pass "
                "--allow_config_change (from Python: sail_jax.run(..., allow_config_change=True)) to resume with the new "
                "values.")
        return changes

    def save(self, config) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(flatten(config), indent=1, sort_keys=True))


def finished_summary(workdir: str, config) -> str | None:
    """The saved summary text of a run that already reached ``config.steps``, else None."""
    path_json, path_text = os.path.join(workdir, SUMMARY_JSON), os.path.join(workdir, SUMMARY_TEXT)
    if not (os.path.exists(path_json) and os.path.exists(path_text)):
        return None
    with open(path_json, encoding="utf-8") as f:
        steps = json.load(f).get("steps")
    if steps != int(config.steps):
        return None
    with open(path_text, encoding="utf-8") as f:
        return f.read()


def write_summary(workdir: str, summary: dict, text: str) -> None:
    """What a finished run leaves (process 0): the numbers, and the block it printed."""
    with open(os.path.join(workdir, SUMMARY_JSON), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(workdir, SUMMARY_TEXT), "w", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")


def clear_summary(workdir: str) -> None:
    """A run that goes on (more steps) no longer has a final summary."""
    for name in (SUMMARY_JSON, SUMMARY_TEXT):
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            os.remove(path)


@dataclasses.dataclass
class WorkdirLock:
    """``flock`` on WORKDIR/.lock; the file names the holder (host, pid, start time) for others to read."""

    workdir: str
    _fd: int | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.workdir, LOCK_FILE)

    def acquire(self) -> str | None:
        """Take the lock; returns a message if a dead run's lock was taken over."""
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise WorkdirLocked(f"{self.workdir} is in use by a running job ({holder}); wait for it to end, stop "
                                "it, or use another --workdir") from None
        if os.fstat(fd).st_ino != getattr(_stat(self.path), "st_ino", None):  # unlinked by a run that just ended
            os.close(fd)
            return self.acquire()
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%F %T')}".encode())
        os.fsync(fd)
        self._fd = fd
        if previous:
            return f"took over the lock of {self.workdir} left by a run that is no longer running ({previous})"
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.remove(self.path)  # before unlocking: a waiting run then locks a fresh file
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _stat(path: str):
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
