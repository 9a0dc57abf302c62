"""The base config every training recipe starts from; files in ``configs/`` override what they need.

Every key is overridable from the command line (``--config.optim.name=lion``). Optional optimizer
arguments are typed placeholders (None = optax's default), so ``--config.optim.kwargs.b2=0.95`` works.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def base_config(recipe: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.recipe = recipe
    c.seed = 0
    c.model = ml_collections.ConfigDict({
        "path": "",  # local Hugging Face folder (config.json + safetensors)
        "tokenizer_path": "",  # default: model.path
        "dtype": "float32",  # compute dtype: float32 | bfloat16
        "param_dtype": "",  # storage dtype; default: dtype
    })
    c.reference = ml_collections.ConfigDict({
        "path": "",  # default: the initial policy
        "precompute": False,  # compute reference log-probs once and cache them in the workdir
        "free": False,  # reference-free preference loss
    })
    c.data = ml_collections.ConfigDict({
        "source": "jsonl",  # jsonl | tfds
        "train_path": "",
        "eval_path": "",
        "tfds_name": "",  # e.g. preference_pairs/hh_rlhf (built with sail_jax.data.tfds_builders)
        "tfds_dir": "",
        "train_split": "train",
        "eval_split": "test",
        "on_error": "raise",  # raise | skip (skipped rows are counted and logged)
        "max_prompt_length": 64,
        "max_length": 128,
    })
    c.loss = ml_collections.ConfigDict({"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0})
    c.optim = ml_collections.ConfigDict({
        "name": "adamw",
        "learning_rate": 1e-5,
        "schedule": "cosine",
        "warmup_steps": 0,
        "end_lr_ratio": 0.0,
        "decay_fraction": 0.2,
        "weight_decay": 0.0,
        "clip_norm": 1.0,
        "grad_accum_steps": 1,
        "kwargs": {"b1": placeholder(float), "b2": placeholder(float), "eps": placeholder(float),
                   "momentum": placeholder(float), "decay": placeholder(float), "nesterov": placeholder(bool)},
    })
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.batch_size = 8  # global, over all processes and devices
    c.eval_batch_size = 8
    c.steps = 100
    c.log_every = 10
    c.eval_every = 50
    c.checkpoint = ml_collections.ConfigDict({"every": 50, "keep": 3, "async_save": True})
    c.export = True
    return c
