"""Optax optimizers and learning-rate schedules chosen by name from a config.

``config.optim``::

    name              adamw | adam | lion | adafactor | sgd | rmsprop
    learning_rate     peak learning rate
    schedule          constant | linear | cosine | wsd (warmup-stable-decay)
    warmup_steps      linear warmup from 0 (all schedules)
    decay_fraction    wsd: fraction of the run spent decaying at the end
    end_lr_ratio      final learning rate / peak (linear, cosine, wsd)
    weight_decay      decoupled for adamw/lion/adafactor, L2 added to the gradient otherwise;
                      never applied to vectors (norm scales, biases)
    clip_norm         global-norm clipping (0 = off)
    grad_accum_steps  micro-batches per update (``optax.MultiSteps``)
    kwargs            extra keyword arguments for the optax constructor (b1, b2, eps, momentum, decay, ...);
                      None values are left to optax's defaults

The learning rate is an injected hyperparameter, so it sits in the optimizer state and is logged.
"""

from __future__ import annotations

import inspect
from typing import Callable

import jax
import optax

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": optax.adamw,
    "adam": optax.adam,
    "lion": optax.lion,
    "adafactor": optax.adafactor,
    "sgd": optax.sgd,
    "rmsprop": optax.rmsprop,  # the optimizer of the SAIL paper's experiments
}
_DECOUPLED_DECAY = {"adamw", "lion", "adafactor"}  # take weight_decay + mask themselves
SCHEDULES = ("constant", "linear", "cosine", "wsd")


def decay_mask(params):
    """Weight decay only on matrices (kernels, embeddings): not on norm scales or biases."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer update (after gradient accumulation)."""
    name, peak = cfg.schedule, float(cfg.learning_rate)
    if name not in SCHEDULES:
        raise ValueError(f"optim.schedule: unknown schedule {name!r}; valid: {list(SCHEDULES)}")
    warmup = int(cfg.get("warmup_steps", 0))
    end = peak * float(cfg.get("end_lr_ratio", 0.0))
    rest = max(total_steps - warmup, 1)
    if name == "constant":
        main = optax.constant_schedule(peak)
    elif name == "linear":
        main = optax.linear_schedule(peak, end, rest)
    elif name == "cosine":
        main = optax.cosine_decay_schedule(peak, rest, alpha=end / peak if peak else 0.0)
    else:
        decay = max(int(round(rest * float(cfg.get("decay_fraction", 0.2)))), 1)
        main = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)], [rest - decay])
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def set_kwargs(cfg) -> dict:
    """``optim.kwargs`` that are set (the unset placeholders mean optax's defaults)."""
    return {k: v for k, v in dict(cfg.get("kwargs", {}) or {}).items() if v is not None}


def unaccepted_kwargs(name: str, kwargs) -> str:
    """Why ``optim.kwargs`` cannot go to optimizer ``name`` ('' when they can): checked in validation,
    before any model is loaded."""
    accepted = inspect.signature(OPTIMIZERS[name]).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if not unknown:
        return ""
    return (f"config.optim.kwargs: {unknown} not accepted by optax.{OPTIMIZERS[name].__name__} (optim.name={name!r}); "
            f"valid: {sorted(k for k in accepted if k != 'learning_rate')}")


def _constructor_kwargs(name: str, kwargs: dict) -> dict:
    problem = unaccepted_kwargs(name, kwargs)
    if problem:
        raise ValueError(problem)
    return dict(kwargs)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """The full transformation: clip -> optimizer (+ weight decay), lr injected, micro-batches accumulated.

    ``total_steps`` counts micro-steps (train-step calls); the schedule runs over optimizer updates.
    """
    name = cfg.name
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name: unknown optimizer {name!r}; valid: {sorted(OPTIMIZERS)}")
    accum = int(cfg.get("grad_accum_steps", 1))
    if accum < 1:
        raise ValueError(f"optim.grad_accum_steps must be >= 1, got {accum}")
    kwargs = _constructor_kwargs(name, set_kwargs(cfg))
    wd, clip = float(cfg.get("weight_decay", 0.0)), float(cfg.get("clip_norm", 0.0))

    def build(learning_rate):
        parts = []
        if clip > 0:
            parts.append(optax.clip_by_global_norm(clip))
        if name in _DECOUPLED_DECAY:
            kwargs_wd = ({"weight_decay_rate": wd, "weight_decay_mask": decay_mask} if name == "adafactor"
                         else {"weight_decay": wd, "mask": decay_mask})
            parts.append(OPTIMIZERS[name](learning_rate=learning_rate, **kwargs_wd, **kwargs))
        else:
            if wd > 0:
                parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
            parts.append(OPTIMIZERS[name](learning_rate=learning_rate, **kwargs))
        return optax.chain(*parts)

    tx = optax.inject_hyperparams(build)(learning_rate=make_schedule(cfg, max(total_steps // accum, 1)))
    return optax.MultiSteps(tx, every_k_schedule=accum) if accum > 1 else tx


def learning_rate(opt_state) -> jax.Array:
    """The current (injected) learning rate of ``make_optimizer``'s state."""
    if isinstance(opt_state, optax.MultiStepsState):
        opt_state = opt_state.inner_opt_state
    return opt_state.hyperparams["learning_rate"]
