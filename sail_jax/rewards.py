"""Reward sources for SAIL-PR labels and for evaluation, behind one call:
``source(prompts, responses) -> float rewards [n]`` on text (prompts: strings or message lists).

  builtin, praise, ifeval
           the oracle of that task in ``sail_jax.tasks`` (ifeval: the fraction of the prompt's
           constraints satisfied)
  model    an HF ``*ForSequenceClassification`` folder (e.g. the reward recipe's export), scoring
           ``prompt + response`` with its own tokenizer and chat template
  python   your function, ``reward.fn = "package.module:function"``, called as
           ``function(prompts, responses) -> one float per response`` (checked: shape and finiteness)
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sail_jax.errors import UserError
from sail_jax.tasks import TASK_NAMES, get_task
from sail_jax.tokenization import Tokenizer, pack_pairs

REWARD_KINDS = (*TASK_NAMES, "model", "python")


class RewardError(UserError):
    pass


class OracleReward:
    """A Python function ``(prompt, response) -> float`` applied row by row."""

    def __init__(self, fn: Callable[[str, str], float]):
        self.fn = fn

    def __call__(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
        return np.asarray([self.fn(p, r) for p, r in zip(prompts, responses)], np.float32)


def import_function(spec: str, key: str = "reward.fn") -> Callable:
    """The callable named ``package.module:function`` (the module must be importable: installed, or on
    PYTHONPATH)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise RewardError(f"config.{key}={spec!r} must name a function as 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise RewardError(f"config.{key}={spec!r}: cannot import {module!r} ({e}); install it or add its folder "
                          "to PYTHONPATH") from None
    except AttributeError:
        raise RewardError(f"config.{key}={spec!r}: module {module!r} has no {name!r}") from None
    if not callable(fn):
        raise RewardError(f"config.{key}={spec!r} is not callable")
    return fn


class PythonReward:
    """A user function scoring a batch: ``fn(prompts, responses)`` must return one finite float per
    response; anything else stops the run with the row and the value."""

    def __init__(self, spec: str):
        self.spec, self.fn = spec, import_function(spec)

    def __call__(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
        try:
            scores = np.asarray(self.fn(list(prompts), list(responses)), dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward.fn {self.spec} returned something that is not a list of numbers ({e})") from None
        if scores.shape != (len(responses),):
            raise RewardError(f"reward.fn {self.spec} returned shape {scores.shape} for {len(responses)} responses; "
                              "it must return one float per response")
        bad = np.flatnonzero(~np.isfinite(scores))
        if len(bad):
            raise RewardError(f"reward.fn {self.spec} returned {scores[bad[0]]} for response {bad[0]} "
                              f"({responses[bad[0]]!r}); scores must be finite")
        return scores.astype(np.float32)


class ModelReward:
    """A reward model loaded from a local HF folder, scored in fixed-shape jitted batches."""

    def __init__(self, path: str, *, max_length: int = 256, batch_size: int = 32):
        from sail_jax.models import load_pretrained

        model = load_pretrained(path)
        if type(model).__name__ != "RewardModel":
            raise ValueError(f"{path}: reward.path must be a *ForSequenceClassification model, "
                             f"got {model.config.architecture}")
        self.tokenizer = Tokenizer.from_pretrained(path)
        self.graphdef, self.params = nnx.split(model)
        self.max_length, self.batch_size = max_length, batch_size
        self._score = jax.jit(lambda params, ids, mask: nnx.merge(self.graphdef, params)(ids, mask))

    def __call__(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
        pairs = [self.tokenizer.encode_pair(p, r, max_prompt_length=self.max_length // 2,
                                            max_length=self.max_length, truncate=True)
                 for p, r in zip(prompts, responses)]
        out = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i:i + self.batch_size]
            chunk = chunk + [chunk[-1]] * (self.batch_size - len(chunk))  # static shape
            batch = pack_pairs(chunk, self.max_length, self.tokenizer.pad_id)
            out.append(np.asarray(self._score(self.params, jnp.asarray(batch["input_ids"]),
                                              jnp.asarray(batch["attention_mask"]))))
        return np.concatenate(out)[: len(pairs)].astype(np.float32)


def make_reward_source(cfg):
    """From ``config.reward``: ``kind`` and, for ``model``, ``path``; for ``python``, ``fn``."""
    if cfg.kind in TASK_NAMES:
        return OracleReward(get_task(cfg.kind).oracle_reward)
    if cfg.kind == "python":
        return PythonReward(cfg.get("fn", ""))
    if cfg.kind == "model":
        if not cfg.path:
            raise ValueError("config.reward.path is empty: point it at a reward-model folder (kind=model)")
        return ModelReward(cfg.path)
    raise ValueError(f"config.reward.kind={cfg.kind!r} is unknown; valid: {list(REWARD_KINDS)}")


def make_eval_reward_source(cfg):
    """The evaluation's reward source when it differs from the labels' (``reward.eval_kind``, and
    ``reward.eval_path`` for a model): e.g. PR labelled by a trained proxy reward model, scored by the
    task's gold oracle (over-optimisation studies). None: evaluate with the labelling source."""
    kind = cfg.get("eval_kind", "")
    if not kind:
        return None
    return make_reward_source(ml_collections.ConfigDict({"kind": kind, "path": cfg.get("eval_path", ""),
                                                         "fn": cfg.get("eval_fn", "")}))
