"""Config validation: fail before any work, naming the offending key, its value and the valid choices."""

from __future__ import annotations

import importlib.util
import math
import os
import re

import jax

from sail_jax.data.buckets import Buckets
from sail_jax.data.hf_datasets import parse_columns
from sail_jax.data.pipeline import SOURCES
from sail_jax.data.records import ON_ERROR
from sail_jax.errors import UserError
from sail_jax.locations import describe_problem
from sail_jax.losses import LOSS_TYPES
from sail_jax.models.quantize import KINDS as QUANT_KINDS
from sail_jax.optim import OPTIMIZERS, SCHEDULES, set_kwargs, unaccepted_kwargs
from sail_jax.sharding import AXES, resolve_axis_sizes


class ConfigError(UserError, ValueError):
    """A config value that cannot work."""


def _require(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


def validate_mesh_and_batches(config, *batch_keys: str) -> tuple[int, ...]:
    """The mesh divides the devices and every batch size divides over the data-parallel axes."""
    try:
        sizes = resolve_axis_sizes(dict(config.mesh), jax.device_count())
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    dp = sizes[AXES.index("data")] * sizes[AXES.index("fsdp")]
    for key in batch_keys:
        value = config[key]
        _require(isinstance(value, int) and value >= 1, f"config.{key}={value!r} must be a positive integer")
        _require(value % dp == 0, f"config.{key}={value} is not divisible by the data-parallel size {dp} "
                                  f"(mesh data x fsdp = {sizes[0]} x {sizes[1]}); use a multiple of {dp}")
        _require(value % jax.process_count() == 0,
                 f"config.{key}={value} is not divisible by the {jax.process_count()} processes")
    return sizes


def validate_model_options(model) -> None:
    """Compute/storage dtypes and the remat policy (they are not part of the checkpoint's config.json)."""
    from sail_jax.configs import model_options
    from sail_jax.models.config import DTYPES, REMAT

    options = model_options(model)
    for name in ("dtype", "param_dtype"):
        _require(options[name] in DTYPES, f"config.model.{name}={options[name]!r} is unknown; valid: {sorted(DTYPES)}")
    _require(options["remat"] in REMAT, f"config.model.remat={options['remat']!r} is unknown; valid: {list(REMAT)}")


def validate_optim(optim) -> None:
    _require(optim.name in OPTIMIZERS, f"config.optim.name={optim.name!r} is unknown; valid: {sorted(OPTIMIZERS)}")
    problem = unaccepted_kwargs(optim.name, set_kwargs(optim))
    _require(not problem, problem)
    _require(optim.schedule in SCHEDULES, f"config.optim.schedule={optim.schedule!r} is unknown; valid: {list(SCHEDULES)}")
    _require(float(optim.learning_rate) >= 0 and math.isfinite(float(optim.learning_rate)),
             f"config.optim.learning_rate={optim.learning_rate!r} must be a finite number >= 0")


def _validate_run(config, *, task_builds_model: bool = False) -> None:
    """What every training run needs: a model folder, loop lengths, checkpoints, optimizer, mesh and batches."""
    if not task_builds_model:
        _require(bool(config.model.path), "config.model.path is empty: point it at a Hugging Face model: a local "
                                          "folder, a Hub id ('org/name', '@revision' to pin) or gs://bucket/path")
        _require_folders(config, ("model.path",))
        tokenizer = config.model.get("tokenizer_path", "") or config.model.path
        _require(not os.path.isdir(tokenizer) or os.path.isfile(os.path.join(tokenizer, "tokenizer.json")),
                 f"config.model.{'tokenizer_path' if tokenizer != config.model.path else 'path'}={tokenizer!r} has "
                 "no tokenizer.json (sail-jax reads fast tokenizers): save one there with transformers' "
                 "AutoTokenizer.from_pretrained(...).save_pretrained(folder), or set config.model.tokenizer_path "
                 "to a folder that has it")
    validate_model_options(config.model)
    for key in ("steps", "log_every", "eval_every"):
        _require(int(config[key]) >= 1, f"config.{key}={config[key]!r} must be >= 1")
    _require(int(config.checkpoint.every) >= 0, "config.checkpoint.every must be >= 0 (0: only at the end, "
                                                        "or never with checkpoint.final=False)")
    _require(int(config.checkpoint.keep) >= 1, "config.checkpoint.keep must be >= 1")
    validate_optim(config.optim)
    validate_mesh_and_batches(config, "batch_size", "eval_batch_size")
    validate_lora(config)
    _require(not config.get("logging", {}).get("wandb", False) or importlib.util.find_spec("wandb") is not None,
             "config.logging.wandb=True needs the wandb package: pip install 'sail-jax[wandb]' (or set "
             "logging.wandb=False)")


def validate_lora(config) -> None:
    lora = config.get("lora")
    if lora is None:
        return
    quantize = lora.get("quantize", "")
    _require(quantize in ("",) + QUANT_KINDS,
             f"config.lora.quantize={quantize!r} is unknown; valid: '' (a base in model.param_dtype), "
             + ", ".join(map(repr, QUANT_KINDS)))
    if int(lora.rank) == 0:
        _require(not quantize, f"config.lora.quantize={quantize!r} quantizes a frozen base, which needs LoRA: set "
                               "config.lora.rank > 0 (e.g. 64), or lora.quantize=''")
        return
    _require(int(lora.rank) > 0, f"config.lora.rank={lora.rank!r} must be >= 0 (0: full training)")
    _require(float(lora.alpha) > 0, f"config.lora.alpha={lora.alpha!r} must be > 0")
    _require(0.0 <= float(lora.dropout) < 1.0, f"config.lora.dropout={lora.dropout!r} must be in [0, 1)")
    try:
        re.compile(lora.targets)
    except re.error as e:
        raise ConfigError(f"config.lora.targets={lora.targets!r} is not a regular expression: {e}") from None
    _require_folders(config, ("lora.path",))
    _require(int(config.get("reference", {}).get("sync_every", 0)) == 0,
             "config.reference.sync_every > 0 (TR-DPO's reference sync) needs a reference separate from the policy; "
             "with LoRA the reference is the frozen base itself. Set reference.sync_every=0 or lora.rank=0")


def _validate_paths(config, *, data: bool) -> None:
    """Every file or folder the config names exists (data files only where the user gives them)."""
    d = config.data
    _require(d.source in SOURCES, f"config.data.source={d.source!r} is unknown; valid: {list(SOURCES)}")
    _validate_data_options(d)
    if data and d.source == "jsonl":
        _require(bool(d.train_path), "config.data.train_path is empty: set it to a JSONL file of training records")
        for key in ("train_path", "eval_path"):
            _require(not d[key] or os.path.isfile(d[key]), f"config.data.{key}={d[key]!r}: no such file")
    if data and d.source == "hf":
        _require(bool(d.get("hf_name", "")), "config.data.hf_name is empty: set it to a Hub dataset id "
                                             "(org/name), a folder of data files, or gs://bucket/path")
        problem = describe_problem(d.hf_name, "data.hf_name", repo_type="dataset")
        _require(problem is None, problem)
        parse_columns(d.get("hf_columns", ""))
    _require_folders(config, ("model.tokenizer_path", "reference.path", "reward.path", "reward.eval_path"))


def _validate_data_options(data) -> None:
    """on_error and the batching keys (buckets, order) every recipe's data section has."""
    _require(data.get("on_error", "raise") in ON_ERROR,
             f"config.data.on_error={data.on_error!r}; valid: {list(ON_ERROR)}")
    Buckets.from_config(data)
    _require(not data.get("group_by_length", False) or data.get("shuffle", True),
             "config.data.group_by_length=True shuffles rows within windows: it needs data.shuffle=True")
    _require(int(data.get("group_window", 64)) >= 1, f"config.data.group_window={data.get('group_window')!r} must be >= 1")


def _validate_lengths(data) -> None:
    _require(0 < data.max_prompt_length < data.max_length,
             f"config.data: need 0 < max_prompt_length ({data.max_prompt_length}) < max_length ({data.max_length})")


def _require_folders(config, keys) -> None:
    """Each ``section.key`` the config sets names a folder: local, a Hub id (in the cache when offline) or
    ``gs://`` (``sail_jax.locations``)."""
    for key in keys:
        section, name = key.split(".")
        problem = describe_problem(config.get(section, {}).get(name, ""), key)
        _require(problem is None, problem)


def _validate_preference_loss(loss) -> None:
    _require(loss.loss_type in LOSS_TYPES, f"config.loss.loss_type={loss.loss_type!r} is unknown; valid: {sorted(LOSS_TYPES)}")
    _require(float(loss.beta) > 0, f"config.loss.beta={loss.beta!r} must be > 0")


def validate_training_config(config) -> None:
    from sail_jax.recipes.offline import RECIPES

    _require(config.recipe in RECIPES, f"config.recipe={config.recipe!r}: valid offline recipes {sorted(RECIPES)}")
    _validate_run(config)
    _validate_paths(config, data=True)
    _validate_lengths(config.data)
    _require(not config.data.get("packing", False) or config.recipe in ("sft", "dpo"),
             f"config.data.packing=True packs SFT and DPO batches; the {config.recipe} recipe takes whole rows "
             "(set data.packing=False)")
    if config.recipe == "dpo":
        _validate_preference_loss(config.loss)
        _require(not (config.reference.free and config.reference.precompute),
                 "config.reference: free (reference-free) and precompute cannot both be set")
        _validate_precompute(config.reference)


def _validate_precompute(ref) -> None:
    """``reference.precompute`` caches log-probs of a reference that must not change, on one process."""
    if not ref.get("precompute", False):
        return
    sync_every = int(ref.get("sync_every", 0))  # offline recipes have no sync
    _require(sync_every == 0,
             f"config.reference.precompute=True with reference.sync_every={sync_every}: a synced reference "
             "changes, so its log-probs cannot be cached; set one of them off")
    _require(jax.process_count() == 1, "config.reference.precompute=True is single-process only; in a "
                                       "multi-process run keep the reference live (precompute=False)")


def validate_score_pairs_config(config) -> None:
    d = config.data
    _validate_data_options(d)
    _require(not d.path or os.path.isfile(d.path), f"config.data.path={d.path!r}: no such file")
    _validate_lengths(d)
    _require_folders(config, ("model.path", "reference.path", "model.tokenizer_path"))
    _validate_preference_loss(config.loss)


def validate_online_config(config) -> None:
    """The online loop's config (../shared/SAIL.md): routes, coefficients, sampling and the buffer.
    With no ``model.path``, the task named by ``task.name`` builds the model and data (checked here,
    before it is built)."""
    from sail_jax.configs import fill_defaults
    from sail_jax.labeling import LABEL_MODES, OPPONENTS, PAIR_SELECTION
    from sail_jax.sail_terms import BASELINES, SCORE_TERMS
    from sail_jax.rewards import REWARD_KINDS
    from sail_jax.tasks import TASK_NAMES

    task_builds_model = not config.model.path
    if task_builds_model:
        name = config.get("task", {}).get("name", "builtin")
        _require(name in TASK_NAMES, f"config.task.name={name!r} is unknown; valid: {list(TASK_NAMES)}")
    fill_defaults(config)  # keys left unset: the task's values, or those for real data
    _validate_run(config, task_builds_model=task_builds_model)
    _validate_paths(config, data=not task_builds_model)
    _require(not config.data.get("packing", False), "config.data.packing=True packs SFT and DPO batches; the "
             "online loop's batches are cut to length buckets instead (set data.packing=False)")
    _validate_preference_loss(config.loss)
    s, g = config.sail, config.generation
    probs = {k: float(s[k]) for k in ("p_dp", "p_pp", "p_pr")}
    _require(all(p >= 0 for p in probs.values()) and sum(probs.values()) <= 1 + 1e-9,
             f"config.sail: route probabilities {probs} must be >= 0 and sum to <= 1 (the rest is offline DPO)")
    for key in ("rho", "lam", "gamma", "revkl"):
        _require(float(s[key]) >= 0, f"config.sail.{key}={s[key]!r} must be >= 0")
    _require(s.get("lam_score", None) is None or float(s.lam_score) >= 0,
             f"config.sail.lam_score={s.get('lam_score')!r} must be >= 0 (unset: sail.lam)")
    scale = s.get("released_code_scale", None)
    _require(scale is None or float(scale) > 0,
             f"config.sail.released_code_scale={scale!r} must be > 0 (unset: rows per device x accumulation steps)")
    _require(s.pair_selection in PAIR_SELECTION,
             f"config.sail.pair_selection={s.pair_selection!r} is unknown; valid: {list(PAIR_SELECTION)}")
    for key in ("pp_label_mode", "pr_label_mode"):
        _require(s[key] in LABEL_MODES, f"config.sail.{key}={s[key]!r} is unknown; valid: {list(LABEL_MODES)}")
    _require(s.baseline in BASELINES, f"config.sail.baseline={s.baseline!r} is unknown; valid: {list(BASELINES)}")
    _require(s.get("online_loss_type", "") in ("", *LOSS_TYPES),
             f"config.sail.online_loss_type={s.get('online_loss_type')!r} is unknown; valid: '' (SAIL's −log σ(β·h)) "
             f"or {sorted(LOSS_TYPES)}")
    opponent = s.get("opponent", "policy")
    _require(opponent in OPPONENTS, f"config.sail.opponent={opponent!r} is unknown; valid: {list(OPPONENTS)}")
    if opponent == "data":
        _require(int(s.num_samples) == 1, f"config.sail.num_samples={s.num_samples}: with sail.opponent='data' "
                                          "(SPIN) each prompt takes one sample, the rejected response; set 1")
        _require(float(s.p_pp) == 0, f"config.sail.p_pp={s.p_pp}: with sail.opponent='data' (SPIN) the dataset's "
                                     "response always wins, nothing is self-labelled; route SPIN rows with p_pr")
    else:
        _require(int(s.num_samples) >= 2, f"config.sail.num_samples={s.num_samples} must be >= 2 (a pair, or a group, "
                                          "per prompt)")
    if opponent != "policy":
        extra = {"gamma": float(s.gamma), "revkl": float(s.revkl),
                 "lam (with p_pp > 0)": float(s.lam) * (float(s.p_pp) > 0)}
        _require(not any(extra.values()),
                 f"config.sail.opponent={opponent!r}: SAIL's score-function and RevKL terms assume both responses "
                 f"are the policy's samples; set {', '.join(k for k, v in extra.items() if v)} to 0")
    if opponent in ("reference", "mixture"):
        whose = "the reference's" if opponent == "reference" else "the policy-reference mixture's"
        _require(int(s.num_samples) == 2 and s.pair_selection == "first_two",
                 f"config.sail.opponent={opponent!r} pairs the policy's sample with {whose}: set "
                 f"sail.num_samples=2 (got {s.num_samples}) and sail.pair_selection='first_two' "
                 f"(got {s.pair_selection!r})")
    if opponent == "mixture":
        coef = float(s.get("mixture_coef", 0.5))
        _require(0.0 <= coef <= 1.0, f"config.sail.mixture_coef={coef!r} must be in [0, 1] (0: the policy, 1: the "
                                     "reference)")
        _require(float(s.p_pp) == 0 and not s.get("online_loss_type", ""),
                 f"config.sail.opponent='mixture' (Nash-MD) labels with the reward source and has its own loss: "
                 f"route its rows with p_pr (p_pp={s.p_pp}) and leave sail.online_loss_type empty "
                 f"(got {s.get('online_loss_type', '')!r})")
    xpo_alpha = float(s.get("xpo_alpha", 0.0))
    _require(xpo_alpha >= 0, f"config.sail.xpo_alpha={xpo_alpha!r} must be >= 0")
    _require(xpo_alpha == 0 or opponent == "reference",
             f"config.sail.xpo_alpha={xpo_alpha} needs sail.opponent='reference' (its term is on the reference's sample)")
    _require(s.score_term in SCORE_TERMS,
             f"config.sail.score_term={s.score_term!r} is unknown; valid: {list(SCORE_TERMS)}")
    _require(config.data.get("eval_kind", "preference") in ("preference", "prompt"),
             f"config.data.eval_kind={config.data.get('eval_kind')!r} is unknown; valid: 'preference' (held-out "
             "pairs) or 'prompt' (held-out prompts only)")
    train_kind = config.data.get("train_kind", "preference")
    _require(train_kind in ("preference", "prompt"),
             f"config.data.train_kind={train_kind!r} is unknown; valid: 'preference' (pairs) or 'prompt' (prompts "
             "only, every row sampled)")
    if train_kind == "prompt":
        from sail_jax.labeling import every_row_sampled

        _require(every_row_sampled(s),
                 f"config.data.train_kind='prompt': prompts without pairs need every row sampled, but sail.p_dp="
                 f"{s.p_dp}, p_pp={s.p_pp}, p_pr={s.p_pr}, opponent={opponent!r}; set p_pp + p_pr = 1 and p_dp = 0 "
                 "(SPIN's opponent='data' needs pairs), or train on pairs (data.train_kind='preference')")
    _require(config.reward.kind in ("", *REWARD_KINDS),
             f"config.reward.kind={config.reward.kind!r} is unknown; valid: '' (none; with no model.path, the "
             f"task's oracle) or {list(REWARD_KINDS)}")
    from sail_jax.rewards import reward_configured

    _require(task_builds_model or reward_configured(config.reward) or float(s.p_pr) == 0 or opponent == "data",
             f"config.reward.kind is empty, but sail.p_pr={s.p_pr} labels sampled pairs with a reward: set "
             f"reward.kind to one of {list(REWARD_KINDS)} ('model' with reward.path, 'python' with reward.fn), or "
             "reward.sources; a task's oracle scores only its own task, so it is the default only where the task "
             "builds the model (no model.path)")
    eval_kind = config.reward.get("eval_kind", "")
    _require(eval_kind in ("", *REWARD_KINDS),
             f"config.reward.eval_kind={eval_kind!r} is unknown; valid: '' (the labels' source) or {list(REWARD_KINDS)}")
    for kind, path in ((config.reward.kind, "path"), (eval_kind, "eval_path")):
        _require(kind != "model" or bool(config.reward.get(path, "")),
                 f"config.reward.{path} is empty: reward kind 'model' needs a reward-model folder")
    for kind, fn in ((config.reward.kind, "fn"), (eval_kind, "eval_fn")):
        if kind == "python":  # importable now, not after the task is built
            from sail_jax.rewards import import_function

            import_function(config.reward.get(fn, ""), f"reward.{fn}")
    sources = config.reward.get("sources", "")
    if sources:
        from sail_jax.rewards import import_function, parse_sources

        _require(not config.reward.kind, f"config.reward.kind={config.reward.kind!r} and reward.sources are both "
                                         "set: the weighted sources are the reward; leave reward.kind empty")
        for i, (_, kind, arg) in enumerate(parse_sources(sources)):
            if kind == "python":
                import_function(arg, f"reward.sources term {i + 1}")
            problem = describe_problem(arg, f"reward.sources term {i + 1}") if kind == "model" else None
            _require(problem is None, problem)
    ref = config.reference
    _require(not ref.get("free", False), "config.reference.free=True: the online loop needs its reference (the "
                                         "implicit reward β·log(π/π_ref) labels and selects pairs); leave it False")
    _require(not ref.get("path", ""), f"config.reference.path={ref.path!r}: the online loop's reference is the "
                                      "initial policy (with LoRA, the base without adapters); leave it empty")
    _validate_precompute(ref)
    _require(float(g.temperature) > 0, f"config.generation.temperature={g.temperature} must be > 0 for sampling")
    _require(int(g.get("slots", 0)) >= 0, f"config.generation.slots={g.get('slots')!r} must be >= 0 (0: all "
             "samples at once; S: continuous batching through S decode slots)")
    _require(int(g.max_new_tokens) <= int(config.data.max_response_length),
             f"config.generation.max_new_tokens={g.max_new_tokens} exceeds data.max_response_length="
             f"{config.data.max_response_length}; sampled responses must fit the batch layout")
    block = int(g.interval) * int(g.reuse)
    _require(int(g.interval) >= 1 and int(g.reuse) >= 1, "config.generation.interval and reuse must be >= 1")
    _require(int(config.checkpoint.every) % block == 0,
             f"config.checkpoint.every={config.checkpoint.every} must be a multiple of generation.interval x reuse "
             f"= {block}, so checkpoints fall between generation blocks (exact resume)")
    if config.get("pg", {}).get("method", ""):
        _validate_group_method(config, block)


def _validate_group_method(config, block: int) -> None:
    """``pg.method`` (GRPO / RLOO): every row sampled and scored by the reward, a group of samples per
    prompt, the pg options known, and exact π_old log-probs where the loss reads them."""
    from sail_jax.group_labeling import needs_old_logps
    from sail_jax.policy_gradient import LOSS_TYPES, METHODS, REWARD_SCALES

    pg, s, g = config.pg, config.sail, config.generation
    _require(pg.method in METHODS, f"config.pg.method={pg.method!r} is unknown; valid: '' (SAIL's pairwise routes) "
                                   f"or {list(METHODS)}")
    _require(float(s.p_pr) == 1 and float(s.p_pp) == 0 and float(s.p_dp) == 0,
             f"config.pg.method={pg.method!r} learns from every sample's reward: set sail.p_pr=1, p_pp=0, p_dp=0 "
             f"(got {s.p_pr}, {s.p_pp}, {s.p_dp})")
    _require(s.get("opponent", "policy") == "policy" and not s.get("online_loss_type", "")
             and not s.get("log_term_grads", False) and s.baseline != "running",
             f"config.pg.method={pg.method!r} replaces SAIL's pairwise loss: leave sail.opponent='policy', "
             "sail.online_loss_type='', sail.log_term_grads=False and sail.baseline='batch_mean'")
    _require(pg.loss_type in LOSS_TYPES, f"config.pg.loss_type={pg.loss_type!r} is unknown; valid: {list(LOSS_TYPES)}")
    _require(pg.scale_rewards in REWARD_SCALES,
             f"config.pg.scale_rewards={pg.scale_rewards!r} is unknown; valid: {list(REWARD_SCALES)}")
    _require(pg.importance_sampling_level in ("token", "sequence"),
             f"config.pg.importance_sampling_level={pg.importance_sampling_level!r} is unknown; valid: "
             "['token', 'sequence']")
    high, delta = pg.get("epsilon_high", None), pg.get("delta", None)
    _require(float(pg.beta) >= 0 and 0 < float(pg.epsilon) < 1 and (high is None or float(high) > 0),
             f"config.pg: beta={pg.beta} must be >= 0, epsilon={pg.epsilon} in (0, 1), epsilon_high={high} > 0")
    _require(delta is None or float(delta) > 1, f"config.pg.delta={delta} must be > 1 (it caps the ratio from "
                                                "above; unset: no cap)")
    if needs_old_logps(pg.method, float(pg.beta), block):
        _require(int(g.top_k) == 0 and float(g.top_p) == 1.0,
                 f"config.generation.top_k={g.top_k}, top_p={g.top_p}: pg.method={pg.method!r} with "
                 f"interval x reuse = {block} and beta = {pg.beta} reads the sampling policy's log-probs, which "
                 "the sampler gives exactly only unfiltered: set top_k=0 and top_p=1")


def validate_config(config) -> None:
    """The whole config of any recipe, before any task is built or model loaded."""
    from sail_jax.recipes import RECIPES

    _require(config.get("recipe") in RECIPES, f"config.recipe={config.get('recipe')!r} is unknown; valid: "
                                              f"{sorted(RECIPES)}")
    if config.recipe == "sail":
        validate_online_config(config)
    elif config.recipe == "score_pairs":
        validate_score_pairs_config(config)
    else:
        validate_training_config(config)
