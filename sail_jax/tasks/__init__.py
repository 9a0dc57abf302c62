"""Built-in tasks, one module each: prompts, a programmatic oracle, and the policy to start from.

Every task module provides
  ``prompts(n, seed, split) -> list``       prompts (strings or chat messages), train/eval by ``split``
  ``oracle_reward(prompt, response) -> float``  the gold reward (the policy only sees it through labels)
  ``build_policy(config, root) -> str``     the starting policy's HF folder under ``root`` (built once)
  ``MODEL_DIR``                             where ``build_policy`` puts it, relative to ``root``
  ``DEFAULTS``                              ``{"section.key": value}`` the run takes when it leaves them unset

``sail_jax.tasks.prepare`` turns a task into the files the online loop reads (policy, offline pairs,
held-out set); ``config.task.name`` picks the task when ``config.model.path`` is empty.
"""

from __future__ import annotations

import importlib

TASK_NAMES = ("builtin", "praise", "ifeval")


def get_task(name: str):
    """The task module ``sail_jax.tasks.<name>``."""
    if name not in TASK_NAMES:
        raise ValueError(f"config.task.name={name!r} is unknown; valid: {list(TASK_NAMES)}")
    return importlib.import_module(f"sail_jax.tasks.{name}")
