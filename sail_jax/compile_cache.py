"""JAX's persistent compilation cache, on by default for the CLI: a second run of the same config (or
a resumed one) loads its compiled programs from disk instead of compiling them again.

``config.compilation_cache``: "" is $JAX_COMPILATION_CACHE_DIR if set, else a per-user folder
($XDG_CACHE_HOME/sail-jax/xla, else ~/.cache/sail-jax/xla); "off" turns it off; anything else is the
folder (a gs:// path works on TPU VMs).
"""

from __future__ import annotations

import os

import jax

OFF = "off"


def cache_dir(setting: str) -> str | None:
    """The folder ``config.compilation_cache`` names (None: off)."""
    setting = str(setting or "").strip()
    if setting == OFF:
        return None
    setting = setting or os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    if setting:
        return setting if "://" in setting else os.path.abspath(os.path.expanduser(setting))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sail-jax", "xla")


def enable(setting: str) -> str | None:
    """Point JAX's persistent cache at ``cache_dir(setting)``; programs that compile in under a
    second are not worth a file. Returns the folder (None: off)."""
    path = cache_dir(setting)
    if path is None:
        return None
    if "://" not in path:
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1.0")))
    return path
