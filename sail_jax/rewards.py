"""Reward sources for SAIL-PR labels and for evaluation, behind one call:
``source(prompts, responses) -> float rewards [n]`` on text (prompts: strings or message lists).

  builtin, praise, ifeval
           the oracle of that task in ``sail_jax.tasks`` (ifeval: the fraction of the prompt's
           constraints satisfied)
  model    an HF ``*ForSequenceClassification`` folder (e.g. the reward recipe's export), scoring
           ``prompt + response`` with its own tokenizer and chat template
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sail_jax.tasks import TASK_NAMES, get_task
from sail_jax.tokenization import Tokenizer, pack_pairs

REWARD_KINDS = (*TASK_NAMES, "model")


class OracleReward:
    """A Python function ``(prompt, response) -> float`` applied row by row."""

    def __init__(self, fn: Callable[[str, str], float]):
        self.fn = fn

    def __call__(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
        return np.asarray([self.fn(p, r) for p, r in zip(prompts, responses)], np.float32)


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
    """From ``config.reward``: ``kind`` and, for ``model``, ``path``."""
    if cfg.kind in TASK_NAMES:
        return OracleReward(get_task(cfg.kind).oracle_reward)
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
    return make_reward_source(ml_collections.ConfigDict({"kind": kind, "path": cfg.get("eval_path", "")}))
