"""Running a recipe on a config: what ``sail-jax`` does after parsing its flags, and what
``sail_jax.run`` does from Python (a notebook, a script, a sweep).

A run validates the whole config first, then holds the workdir's lock, checks that a resumed run keeps
its config (sail_jax.workdir), and runs the recipe. The same call on a finished run returns its saved
summary. Multi-process runs call ``sail_jax.distributed.initialize`` first (the CLI's flags do).
"""

from __future__ import annotations

import copy
import os
import sys


def _admit(config, workdir: str, lock, allow_config_change: bool) -> str | None:
    """Process 0's checks before a run: the lock, the stored identity; returns the saved summary of a
    finished run (nothing to do), else records this config as the run's and returns None."""
    from sail_jax.train import checkpoint_dir
    from sail_jax.workdir import Identity, clear_summary, finished_summary

    took_over = lock.acquire()
    if took_over:
        print(took_over, file=sys.stderr)
    if "steps" in config:  # a training run (score_pairs is one pass: nothing to resume)
        identity = Identity(checkpoint_dir(config, workdir))
        for change in identity.check(config, allow_change=allow_config_change):
            print(f"config change allowed (allow_config_change): {change}", file=sys.stderr)
        done = finished_summary(workdir, config)
        if done is not None:
            return done
        clear_summary(workdir)
        identity.save(config)
    with open(os.path.join(workdir, "config.txt"), "w") as f:
        f.write(str(config))  # the resolved config, overrides included
    return None


def _take_reward(config, reward) -> None:
    """``reward``, a Python callable ``(prompts, responses) -> one float per response``, becomes the
    run's reward source: ``reward.kind='python'`` with ``reward.fn`` naming it (the config stays text,
    saved with the run and compared on resume)."""
    from sail_jax.errors import UserError
    from sail_jax.rewards import register_callable

    if config.get("recipe") != "sail":
        raise UserError(f"reward=...: only the online loop (recipe 'sail') scores samples; config.recipe="
                        f"{config.get('recipe')!r} reads no reward")
    if config.reward.kind or config.reward.get("sources", ""):
        raise UserError(f"reward=... and config.reward (kind={config.reward.kind!r}, sources="
                        f"{config.reward.get('sources', '')!r}) both name the reward: keep one")
    config.reward.update(kind="python", fn=register_callable(reward))


def launch(config, workdir: str, *, reward=None, allow_config_change: bool = False) -> dict | str | None:
    """Validate ``config``, then run its recipe in ``workdir`` (resuming what is there); returns the
    recipe's summary (a dict), or the saved summary text of a run that had already finished.

    ``reward``: a Python callable scoring samples, as TRL's trainers take one (SAIL configs only).
    ``allow_config_change``: resume although the config changed (the changed keys are printed).
    On CPU, ``sail-jax`` also sets XLA:CPU's memory-minimising schedule; from Python, set
    ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` before jax is imported for the same.
    """
    from sail_jax import compile_cache, distributed
    from sail_jax.errors import UserError
    from sail_jax.recipes import get_recipe
    from sail_jax.validation import validate_config
    from sail_jax.workdir import WorkdirLock

    config = copy.deepcopy(config)  # the run's own: the caller's stays as given (a notebook reruns its cell)
    if reward is not None:
        _take_reward(config, reward)
    validate_config(config)  # the whole config, before any task is built or model loaded
    compile_cache.enable(config.get("compilation_cache", ""))
    lock = WorkdirLock(workdir)
    try:
        # Process 0 decides (its workdir holds the lock and the summary) and tells the others.
        done, error = None, None
        if distributed.is_main():
            try:
                done = _admit(config, workdir, lock, allow_config_change)
            except UserError as e:
                error = e
        go = distributed.from_main(-1 if error else 0 if done is not None else 1)
        if error is not None:
            raise error
        if go < 0:
            raise UserError("process 0 refused to start this run; its log says why")
        if done is not None:
            print(f"{workdir} holds a finished run of this config ({config.steps} steps); its summary:\n\n{done}")
            return done
        return get_recipe(config.recipe)(config, workdir) if go else None
    finally:
        lock.release()
