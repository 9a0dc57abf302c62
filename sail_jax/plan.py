"""Memory planner: what each device will hold for a config's run on a target slice, before renting it.

    sail-jax plan --config=configs/qwen2_5_7b_sail.py [--target=v5e-32] [--config.model.remat=full]

Per device, for the config's model (its folder's ``config.json``, or ``model.hub_id``), dtypes,
remat policy, mesh and batch shapes:

  params, optimizer state,   exact: shard shapes under ``sharding.PARTITION_RULES`` on the target
  gradients, reference       mesh (the reference is a second copy of the params when it is live;
                             with LoRA, params/gradients/optimizer are the adapters', and the frozen
                             base is its own row: it is the reference too, so there is no copy)
  activations                XLA's own buffer assignment for one device's rows of the loss and its
                             gradient, compiled (never run) on the host: the whole model up to 5
                             decoder layers, else at 2 to 5 layers extended linearly by the median
                             per-layer increment, split over the tensor axis; FSDP adds the gathered
                             weights the backward pass reuses (every layer without remat, one with)
                             and one layer's gradient
  KV cache, sampling         the generation cache for ``batch_size x num_samples`` rows (SAIL), and the
                             labelling pass's largest forward buffer
The peak is the largest of the phases (train step, generation, labelling); the run fits when the
peak stays under the target's usable memory (TPU: 95% of HBM; GPU: 75%, JAX's default
preallocation). The host compiles with XLA's memory-minimising scheduler, as TPU and GPU compilers
schedule; tests check the totals against the compiled train step of tiny models within 15%.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sail_jax.models import ModelConfig, build_model, init_cache
from sail_jax.sampling import cache_length
from sail_jax.sharding import AXES, opt_state_shardings, param_shardings, resolve_axis_sizes
from sail_jax.train import policy

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    devices: int
    device_bytes: int  # memory of one device
    usable_fraction: float  # what a JAX process may use of it

    @property
    def usable_bytes(self) -> int:
        return int(self.device_bytes * self.usable_fraction)


# chips per slice name: v4/v5p count TensorCores (2 per chip), v5e/v6e count chips.
_TPU = {"v4": (2, 32 * GIB), "v5p": (2, 95 * GIB), "v5e": (1, 16 * GIB), "v5litepod": (1, 16 * GIB),
        "v6e": (1, 32 * GIB)}
_GPU = {"h100": 80 * 10**9, "h200": 141 * 10**9, "a100-40": 40 * 10**9, "a100-80": 80 * 10**9, "l4": 24 * 10**9}


def parse_target(name: str) -> Target:
    """``v4-8``, ``v5e-32``, ``v5litepod-16``, ``v5p-8``, ``v6e-8``, ``1xH100``, ``8xA100-80``, ``cpu``."""
    tpu = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.lower())
    if tpu:
        per_chip, hbm = _TPU[tpu.group(1)]
        cores = int(tpu.group(2))
        if cores % per_chip:
            raise ValueError(f"target {name!r}: {tpu.group(1)} slices count {per_chip} cores per chip")
        return Target(name, cores // per_chip, hbm, 0.95)
    gpu = re.fullmatch(r"(\d+)x([a-z0-9-]+)", name.lower())
    if gpu and gpu.group(2) in _GPU:
        return Target(name, int(gpu.group(1)), _GPU[gpu.group(2)], 0.75)
    raise ValueError(f"unknown target {name!r}; use a TPU slice (v4-8, v5e-32, v5litepod-16, v5p-8, v6e-8) or "
                     f"NxGPU with GPU in {sorted(_GPU)} (e.g. 1xH100)")


def model_config_of(config) -> ModelConfig:
    """The architecture to plan for, with the config's dtypes and remat policy."""
    from sail_jax.models.hf import read_config
    from sail_jax.locations import is_hub_id, is_remote, local_folder
    from sail_jax.models.known import KNOWN_CONFIGS, known_config

    from sail_jax.configs import model_options

    m = config.model
    options = model_options(m)
    if m.path and os.path.exists(os.path.join(m.path, "config.json")):
        return read_config(m.path, **options)
    if m.get("hub_id"):
        return known_config(m.hub_id, **options)
    if m.path in KNOWN_CONFIGS:  # a Hub id we know: planned before anything is downloaded
        return known_config(m.path, **options)
    if m.path and (is_remote(m.path) or is_hub_id(m.path)):  # only its config.json is fetched
        return read_config(local_folder(m.path, key="model.path", patterns=("config.json",)), **options)
    if not m.path and config.recipe == "sail":
        task = config.task.get("name", "builtin")
        if task != "ifeval":
            from sail_jax.tasks import tiny_policy

            return tiny_policy.model_config().replace(**options)
        return known_config("HuggingFaceTB/SmolLM2-135M-Instruct", **options)
    raise ValueError(f"config.model.path={m.path!r} has no config.json and config.model.hub_id is not set: "
                     "download the model, or set model.hub_id to a model of sail_jax.models.known")


@dataclasses.dataclass
class Plan:
    target: Target | None
    mesh: dict[str, int]
    rows: dict[str, int]  # component -> bytes per device
    phases: dict[str, int]  # phase -> bytes per device at its peak

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def fits(self) -> bool | None:
        return None if self.target is None else self.peak <= self.target.usable_bytes

    def table(self) -> str:
        lines = [f"{'component (per device)':<34}{'GiB':>10}"]
        lines += [f"  {name:<32}{b / GIB:>10.3f}" for name, b in self.rows.items()]
        lines += [f"{'phase peak':<34}"] + [f"  {name:<32}{b / GIB:>10.3f}" for name, b in self.phases.items()]
        if self.target is not None:
            t = self.target
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"peak {self.peak / GIB:.2f} GiB of {t.usable_bytes / GIB:.1f} GiB usable on {t.name} "
                         f"({t.devices} x {t.device_bytes / GIB:.1f} GiB, {t.usable_fraction:.0%}): {verdict}")
        return "\n".join(lines)


def _nbytes(shape, dtype) -> int:
    return int(math.prod(shape)) * jnp.dtype(dtype).itemsize


def _sharded_bytes(tree, shardings) -> int:
    return sum(_nbytes(s.shard_shape(x.shape), x.dtype) for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


@dataclasses.dataclass(frozen=True)
class _Abstract:
    """Abstract parameters: what trains, and (LoRA) the frozen base, which is also the reference."""

    graphdef: object
    params: object  # trained: every parameter, or the adapters
    base: object | None  # LoRA's frozen base (None: full training)
    base_graphdef: object  # the model without adapters (the reference's graph)


def _abstract_model(model_config: ModelConfig, lora=None) -> _Abstract:
    if lora is None or not int(lora.rank):
        graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(model_config)))
        return _Abstract(graphdef, params, None, graphdef)
    from sail_jax.trainable import attach_lora

    base_graphdefs = []

    def adapted():
        model = build_model(model_config)
        base_graphdefs.append(attach_lora(model, {**lora.to_dict(), "path": ""}, seed=0))  # shapes only
        return model

    graphdef, adapters, base = nnx.split(nnx.eval_shape(adapted), nnx.LoRAParam, ...)
    return _Abstract(graphdef, adapters, base, base_graphdefs[0])


def _batch_spec(config, rows: int) -> tuple[dict[str, jax.ShapeDtypeStruct], str]:
    """Abstract train batch of ``rows`` examples in the recipe's layout, and the objective's kind."""
    d, i32, f32 = config.data, jnp.int32, jnp.float32
    sds = jax.ShapeDtypeStruct
    if config.recipe == "sail":
        p, r = int(d.max_prompt_length), int(d.max_response_length)
        batch = {"prompt_ids": sds((rows, p), i32), "prompt_mask": sds((rows, p), i32), "route": sds((rows,), i32),
                 "valid": sds((rows,), i32), "ref_chosen_logps": sds((rows,), f32),
                 "ref_rejected_logps": sds((rows,), f32)}
        for side in ("chosen", "rejected"):
            batch[f"{side}_response"] = batch[f"{side}_response_mask"] = sds((rows, r), i32)
        return batch, "sail"
    t = int(d.max_length)
    if config.recipe == "sft":
        return {k: sds((rows, t), i32) for k in ("input_ids", "attention_mask", "loss_mask")} | {
            "valid": sds((rows,), i32)}, "sft"
    batch = {f"{s}_{k}": sds((rows, t), i32) for s in ("chosen", "rejected")
             for k in ("input_ids", "attention_mask", "loss_mask")}
    batch["valid"] = sds((rows,), i32)
    if config.recipe == "dpo" and config.reference.get("precompute", False) and not config.reference.get("free"):
        batch["ref_chosen_logps"] = batch["ref_rejected_logps"] = sds((rows,), f32)
    return batch, config.recipe


def _reference_is_live(config) -> bool:
    if config.recipe == "sail":
        return True
    return config.recipe == "dpo" and not (config.reference.get("free", False) or config.reference.get("precompute", False))


def _objective(config, graphdef):
    from sail_jax.objectives import make_dpo_objective, make_sail_objective, reward_objective, sft_objective

    if config.recipe == "sail":
        return make_sail_objective(config.loss, config.sail)
    if config.recipe == "dpo":
        mode = "none" if config.reference.get("free", False) else (
            "cached" if config.reference.get("precompute", False) else "model")
        return make_dpo_objective(config.loss, graphdef, mode)
    return {"sft": sft_objective, "reward": reward_objective}[config.recipe]


def _frozen(config, model: _Abstract):
    """The train step's read-only inputs: with LoRA the base, which is also DPO's reference."""
    frozen = {} if model.base is None else {"base": model.base}
    if config.recipe == "sail":
        from sail_jax.sail_terms import RunningBaseline

        return {**frozen, "baseline": jax.eval_shape(RunningBaseline.init)}
    if _reference_is_live(config):
        frozen["reference"] = model.params if model.base is None else model.base
    return frozen


def _compiled_temp(fn, *args) -> int:
    """XLA's temporary buffer bytes for ``fn`` at these abstract shapes (compiled on the host, not run)."""
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def _saved_bytes(fn, *args) -> int:
    """Bytes the backward pass of ``fn`` keeps from its forward pass (its residuals, inputs excluded)."""
    closed, shapes = jax.make_jaxpr(lambda *a: jax.vjp(fn, *a), return_shape=True)(*args)
    jaxpr, inputs = closed.jaxpr, set(closed.jaxpr.invars) | set(closed.jaxpr.constvars)
    residuals = {v for v in jaxpr.outvars[len(jaxpr.outvars) - len(jax.tree.leaves(shapes[1])):]
                 if not hasattr(v, "val") and v not in inputs}
    return sum(_nbytes(v.aval.shape, v.aval.dtype) for v in residuals)


_MEASURED_LAYERS = (2, 3, 4, 5)


def _per_layer_extrapolation(measure, num_layers: int, saved=None) -> int:
    """``measure(layers)`` itself for models of up to 5 layers; beyond, measured at 2 to 5 layers (the
    first layer shares buffers with the embedding and head, later ones repeat) and extended linearly
    to ``num_layers`` with the *median* per-layer increment: XLA:CPU's scheduler adds an outlier step
    now and then (Qwen2.5-1.5B with LoRA: +0.51, +0.18, +0.18 GiB from 2 to 5 layers), which one
    difference alone would multiply by the depth. Each layer adds at least what its backward pass
    keeps (``saved(layers)``, when given)."""
    if num_layers <= _MEASURED_LAYERS[-1]:
        return measure(num_layers)
    values = [measure(n) for n in _MEASURED_LAYERS]
    step = max(sorted(b - a for a, b in zip(values, values[1:]))[1], saved(3) - saved(2) if saved else 0, 0)
    return values[-1] + (num_layers - _MEASURED_LAYERS[-1]) * step


def train_activation_bytes(config, model_config: ModelConfig, rows: int) -> int:
    """Temporary bytes of one device's loss-and-gradient (activations kept for the backward pass,
    recomputation and working buffers), ``rows`` examples per device."""
    batch, _ = _batch_spec(config, rows)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

    def abstract(layers):
        return _abstract_model(model_config.replace(num_layers=layers, sliding_windows=(
            None if model_config.sliding_windows is None else model_config.sliding_windows[:layers])),
            config.get("lora"))

    def measure(layers):
        model = abstract(layers)
        objective = _objective(config, model.base_graphdef)

        def grad(params, batch, frozen, rng):
            grads = jax.grad(lambda p: objective(policy(model.graphdef, p, frozen), batch, frozen, rng)[0])(params)
            # Global-norm clipping makes XLA:CPU schedule every layer's recomputation early, undoing
            # remat (measured: 82 -> 225 MB on a tiny model); the plan assumes the accelerator keeps
            # remat's savings, and counts the clip's effect on the schedule only without remat.
            if float(config.optim.get("clip_norm", 0.0)) > 0 and model_config.remat == "none":
                grads = optax.clip_by_global_norm(float(config.optim.clip_norm)).update(grads, None)[0]
            return grads

        return _compiled_temp(grad, model.params, batch, _frozen(config, model), rng)

    def saved(layers):
        model = abstract(layers)
        objective = _objective(config, model.base_graphdef)
        return _saved_bytes(lambda p, b, f, r: objective(policy(model.graphdef, p, f), b, f, r)[0], model.params,
                            batch, _frozen(config, model), rng)

    # Without remat the jaxpr's residuals overcount what XLA keeps (it fuses elementwise chains), so
    # the floor applies to remat policies only, where the residuals are the layer inputs or matmuls.
    return _per_layer_extrapolation(measure, model_config.num_layers, saved if model_config.remat != "none" else None)


def labelling_bytes(config, model_config: ModelConfig, rows: int) -> int:
    """Temporary bytes of the labelling pass (log-probs of ``rows`` sampled responses per device)."""
    from sail_jax.objectives import response_logps

    d = config.data
    p, r = int(d.max_prompt_length), int(d.max_response_length)
    sds = jax.ShapeDtypeStruct
    rows_spec = (sds((rows, p), jnp.int32), sds((rows, p), jnp.int32), sds((rows, r), jnp.int32),
                 sds((rows, r), jnp.int32))

    def measure(layers):
        model = _abstract_model(model_config.replace(num_layers=layers, sliding_windows=None), config.get("lora"))
        states = (model.params,) if model.base is None else (model.params, model.base)
        return _compiled_temp(lambda states, *x: response_logps(nnx.merge(model.graphdef, *states), *x)[0], states,
                              *rows_spec)

    return _per_layer_extrapolation(measure, model_config.num_layers)


def kv_cache_bytes(config, model_config: ModelConfig, rows: int, tensor: int) -> int:
    """The sampler's cache for ``rows`` sequences on one device (prompt and budget bucketed as it does)."""
    length = cache_length(int(config.data.max_prompt_length), int(config.generation.max_new_tokens))
    kv = model_config.num_kv_heads // tensor if model_config.num_kv_heads % tensor == 0 else model_config.num_kv_heads
    cache = jax.eval_shape(lambda: init_cache(model_config.replace(num_kv_heads=kv), rows, length))
    return sum(_nbytes(x.shape, x.dtype) for x in jax.tree.leaves(cache))


def fsdp_gather_bytes(params, mesh_sizes: dict[str, int], model_config: ModelConfig) -> int:
    """FSDP: decoder-layer weights are all-gathered (per tensor shard) for the forward pass. Without
    remat the backward pass reuses them, so every layer's gathered weights stay live; with remat the
    gather is redone inside each layer's recomputation. Plus one layer's full gradient before its
    reduce-scatter."""
    if mesh_sizes["fsdp"] == 1:
        return 0
    layers = sum(x.size * x.dtype.itemsize for path, x in jax.tree_util.tree_leaves_with_path(params)
                 if "layers" in jax.tree_util.keystr(path)) // mesh_sizes["tensor"]
    one = layers // model_config.num_layers
    return (layers if model_config.remat == "none" else one) + one


def make_plan(config, *, target: Target | None = None, num_devices: int | None = None,
              model_config: ModelConfig | None = None) -> Plan:
    """The plan of ``config`` on ``target`` (or on ``num_devices`` devices without a memory verdict);
    ``model_config`` replaces the config's model (tests). Keys left unset are filled in
    (``configs.fill_defaults``), as a run would."""
    from sail_jax.configs import fill_defaults
    from sail_jax.optim import make_optimizer

    fill_defaults(config)

    devices = target.devices if target is not None else (num_devices or jax.device_count())
    sizes = dict(zip(AXES, resolve_axis_sizes(dict(config.mesh), devices)))
    mesh = AbstractMesh(tuple(sizes.values()), AXES)
    dp = sizes["data"] * sizes["fsdp"]
    if int(config.batch_size) % dp:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the data-parallel size {dp} "
                         f"of mesh {sizes} on {devices} devices")
    model_config = model_config or model_config_of(config)
    model = _abstract_model(model_config, config.get("lora"))
    params = model.params
    p_shardings = param_shardings(params, mesh)
    tx = make_optimizer(config.optim, int(config.steps))
    opt_state = jax.eval_shape(tx.init, params)
    o_shardings = opt_state_shardings(tx, opt_state, params, mesh)

    rows = int(config.batch_size) // dp
    batch, _ = _batch_spec(config, rows)
    params_bytes = _sharded_bytes(params, p_shardings)
    lora = model.base is not None
    out = {
        "params": params_bytes,
        **({"frozen base (= reference)": _sharded_bytes(model.base, param_shardings(model.base, mesh))} if lora else {}),
        "optimizer state": _sharded_bytes(opt_state, o_shardings),
        "gradients": params_bytes,
        "reference": params_bytes if _reference_is_live(config) and not lora else 0,
        "batch": sum(_nbytes(x.shape, x.dtype) for x in jax.tree.leaves(batch)),
        # XLA splits each layer's activations over the tensor axis (measured within 15% on 2-way TP).
        f"activations (remat={model_config.remat})": train_activation_bytes(config, model_config, rows) // sizes["tensor"],
        "FSDP gathered weights": fsdp_gather_bytes(model.base if lora else params, sizes, model_config),
    }
    state = out["params"] + out.get("frozen base (= reference)", 0) + out["optimizer state"] + out["reference"]
    phases = {"train step": sum(out.values())}
    if config.recipe == "sail":
        samples = int(config.batch_size) * int(config.sail.num_samples)
        sample_rows = samples // dp if samples % dp == 0 else samples
        out["KV cache (generation)"] = kv_cache_bytes(config, model_config, sample_rows, sizes["tensor"])
        out["labelling pass"] = labelling_bytes(config, model_config, sample_rows) // sizes["tensor"]
        phases["generation"] = state + out["KV cache (generation)"]
        phases["labelling"] = state + out["labelling pass"]
    return Plan(target, sizes, out, phases)


def measured_train_step_bytes(config, model, mesh) -> int:
    """Per-device bytes of the real compiled train step (arguments + temporaries + outputs not
    aliased to the donated state): what ``make_plan``'s train phase predicts. Tiny models only."""
    from sail_jax.optim import make_optimizer
    from sail_jax.train import abstract_like, make_train_step
    from sail_jax.trainable import prepare

    tx = make_optimizer(config.optim, int(config.steps))
    trainable, state, shardings = prepare(model, tx, mesh, config.lora, seed=0)
    objective = _objective(config, trainable.base_graphdef)
    frozen, frozen_sh = dict(trainable.frozen), dict(trainable.frozen_shardings)
    replicated = NamedSharding(mesh, P())
    if config.recipe == "sail":
        from sail_jax.sail_terms import RunningBaseline

        frozen["baseline"] = jax.eval_shape(RunningBaseline.init)
        frozen_sh["baseline"] = jax.tree.map(lambda _: replicated, frozen["baseline"])
    elif _reference_is_live(config):
        if trainable.lora:
            frozen["reference"], frozen_sh["reference"] = frozen["base"], frozen_sh["base"]
        else:
            frozen["reference"], frozen_sh["reference"] = state.params, shardings.params
    step = make_train_step(trainable.graphdef, tx, objective, mesh, shardings, frozen_sh, seed=0)
    batch, _ = _batch_spec(config, int(config.batch_size))
    m = step.lower(abstract_like(state, shardings), batch, abstract_like(frozen, frozen_sh)).compile().memory_analysis()
    total = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    if trainable.lora and "reference" in frozen:  # one buffer passed twice: XLA counts it twice
        total -= _sharded_bytes(frozen["base"], frozen_sh["base"])
    if config.recipe == "sail" and not trainable.lora:  # the reference copy, held outside the step
        total += _sharded_bytes(state.params, shardings.params)
    return int(total)
