"""Reward sources for SAIL-PR labels and for evaluation, behind one call:
``source(prompts, responses) -> float rewards [n]`` on text (prompts: strings or message lists).

  builtin, praise, ifeval
           the oracle of that task in ``sail_jax.tasks`` (ifeval: the fraction of the prompt's
           constraints satisfied)
  model    an HF ``*ForSequenceClassification`` folder (e.g. the reward recipe's export), scoring
           ``prompt + response`` with its own tokenizer and chat template
  python   your function, ``reward.fn = "package.module:function"``, called as
           ``function(prompts, responses) -> one float per response`` (checked: shape and finiteness)

or a weighted sum of several (``reward.sources``, with ``reward.kind`` left empty), written as terms
``[WEIGHT*]KIND[:ARG]`` joined by ``+``: ARG is the folder for ``model`` and ``package.module:function``
for ``python``; e.g. ``"0.7*builtin + 0.3*python:my_rewards:brevity + 0.1*model:runs/rm/export"``.
The sum is plain (no rescaling): choose weights for the sources' scales.
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
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


# Reward functions handed over as Python objects (``sail_jax.run(config, workdir, reward=fn)``), under the
# name ``reward.fn`` gives them ("callable:<module>.<qualname>"): the config stays text, saved with the
# run and compared when it resumes.
CALLABLE_PREFIX = "callable:"
_CALLABLES: dict[str, Callable] = {}


def register_callable(fn) -> str:
    """``fn``'s name for ``reward.fn``; later lookups of that name (``import_function``) return ``fn``."""
    if not callable(fn):
        raise RewardError(f"reward={fn!r} is not callable: pass a function (prompts, responses) -> one float each")
    name = f"{CALLABLE_PREFIX}{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    _CALLABLES[name] = fn
    return name


def import_function(spec: str, key: str = "reward.fn") -> Callable:
    """The callable named ``package.module:function`` (the module must be importable: installed, or on
    PYTHONPATH), or one handed to ``sail_jax.run`` in this process."""
    if spec.startswith(CALLABLE_PREFIX):
        if spec not in _CALLABLES:
            raise RewardError(f"config.{key}={spec!r} was a Python function handed to sail_jax.run; hand it over "
                              "again (sail_jax.run(config, workdir, reward=fn)), or name an importable one as "
                              "'package.module:function'")
        return _CALLABLES[spec]
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

    def __init__(self, spec: str, key: str = "reward.fn"):
        self.spec, self.key, self.fn = spec, key, import_function(spec, key)

    def __call__(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
        name = f"{self.key} {self.spec}"
        try:
            scores = np.asarray(self.fn(list(prompts), list(responses)), dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise RewardError(f"{name} returned something that is not a list of numbers ({e})") from None
        if scores.shape != (len(responses),):
            raise RewardError(f"{name} returned shape {scores.shape} for {len(responses)} responses; "
                              "it must return one float per response")
        bad = np.flatnonzero(~np.isfinite(scores))
        if len(bad):
            raise RewardError(f"{name} returned {scores[bad[0]]} for response {bad[0]} "
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


def parse_sources(spec: str) -> list[tuple[float, str, str]]:
    """``reward.sources`` as ``[(weight, kind, arg)]``; a term that does not parse is named with the fix."""
    terms = []
    for i, term in enumerate(t.strip() for t in spec.split("+")):
        where = f"config.reward.sources term {i + 1} ({term!r})"
        weight, star, source = term.partition("*")
        if not star:
            weight, source = "1", term
        try:
            w = float(weight)
        except ValueError:
            raise RewardError(f"{where}: weight {weight.strip()!r} is not a number; write WEIGHT*KIND[:ARG]") from None
        kind, _, arg = source.strip().partition(":")
        if kind not in REWARD_KINDS:
            raise RewardError(f"{where}: kind {kind!r} is unknown; valid: {list(REWARD_KINDS)}")
        if kind in ("model", "python") and not arg:
            raise RewardError(f"{where}: {kind} needs its " + ("folder (model:PATH)" if kind == "model" else
                                                              "function (python:package.module:function)"))
        if kind in TASK_NAMES and arg:
            raise RewardError(f"{where}: the {kind} oracle takes no argument")
        if not np.isfinite(w) or w == 0:
            raise RewardError(f"{where}: weight {w} must be finite and nonzero")
        terms.append((w, kind, arg))
    return terms


class WeightedReward:
    """``Σ weight · source(prompts, responses)`` over the parsed ``reward.sources``."""

    def __init__(self, spec: str):
        self.terms = [(w, _source(kind, arg, f"reward.sources term {i + 1}"))
                      for i, (w, kind, arg) in enumerate(parse_sources(spec))]

    def __call__(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
        return sum(w * source(prompts, responses) for w, source in self.terms).astype(np.float32)


def _source(kind: str, arg: str, key: str):
    """One source: a task's oracle, a reward-model folder (``arg``) or a function (``arg``)."""
    if kind in TASK_NAMES:
        return OracleReward(get_task(kind).oracle_reward)
    if kind == "python":
        return PythonReward(arg, key)
    if kind == "model":
        if not arg:
            raise ValueError(f"config.{key} is empty: point it at a reward-model folder (kind=model)")
        return ModelReward(arg)
    raise ValueError(f"config.reward.kind={kind!r} is unknown; valid: {list(REWARD_KINDS)}")


def _configured(cfg, kind: str, prefix: str = ""):
    """The source ``kind`` with its argument from ``config.reward``: ``{prefix}path`` for a model,
    ``{prefix}fn`` for a function (prefix ``eval_`` for the evaluation's source)."""
    arg_key = {"model": f"{prefix}path", "python": f"{prefix}fn"}.get(kind, f"{prefix}kind")
    return _source(kind, cfg.get(arg_key, "") if kind in ("model", "python") else "", f"reward.{arg_key}")


def reward_configured(cfg) -> bool:
    """Whether ``config.reward`` names a source (``kind`` or ``sources``)."""
    return bool(cfg.get("kind", "") or cfg.get("sources", ""))


def make_reward_source(cfg):
    """From ``config.reward``: ``sources``, or ``kind`` with ``path`` (model) or ``fn`` (python); None
    when neither is set (a run on the user's own model and data that names no reward: nothing is
    scored, rather than scored by a task's oracle that knows nothing of that data)."""
    if cfg.get("sources", ""):
        return WeightedReward(cfg.sources)
    return _configured(cfg, cfg.kind) if cfg.get("kind", "") else None


def make_eval_reward_source(cfg):
    """The evaluation's reward source when it differs from the labels' (``reward.eval_kind``, and
    ``reward.eval_path`` for a model): e.g. PR labelled by a trained proxy reward model, scored by the
    task's gold oracle (over-optimisation studies). None: evaluate with the labelling source."""
    kind = cfg.get("eval_kind", "")
    if not kind:
        return None
    return _configured(cfg, kind, "eval_")
