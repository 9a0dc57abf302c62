"""Train state, jitted train/eval steps on a mesh, orbax checkpoints with exact resume, metric logs.

A step is a pure function ``(TrainState, batch, frozen) -> (TrainState, metrics)`` compiled once with
explicit in/out shardings and the state donated. ``frozen`` carries read-only arrays the loss needs
(the reference model's parameters), sharded like the policy's. Randomness inside a step comes from
``fold_in(key(seed), step)``, so the step counter *is* the PRNG state: a resumed run draws the same
keys as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import json
import os
import re
import sys
import time
import uuid
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sail_jax.errors import UserError
from sail_jax.models.lora import with_dropout_keys
from sail_jax.optim import learning_rate
from sail_jax.sharding import batch_sharding, opt_state_shardings, param_shardings

_DROPOUT_STREAM = 0x10AA  # the step key's branch that adapter dropout draws from (the loss keeps the key)

# loss_fn(model, batch, frozen, rng) -> (scalar loss, {name: scalar metric})
LossFn = Callable[[nnx.Module, dict, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: train-step calls so far (micro-steps under gradient accumulation)
    params: Any  # nnx.State of the policy's parameters
    opt_state: Any


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh):
    """``(graphdef, state, shardings)`` with parameters and optimizer state laid out on ``mesh``."""
    graphdef, params = nnx.split(model)
    return (graphdef, *_train_state(params, tx, mesh))


def create_adapter_train_state(model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh,
                               trainable=nnx.LoRAParam):
    """LoRA: ``(graphdef, state, shardings, base, base_shardings)``. Only the adapters (and whatever
    else ``trainable``, an nnx filter, selects: a reward model's new head) train: the state, its
    gradients and optimizer state hold nothing else; the base is frozen, and is passed to the steps as
    ``frozen["base"]`` (see ``policy``)."""
    graphdef, adapters, base = nnx.split(model, trainable, ...)
    base_shardings = param_shardings(base, mesh)
    return (graphdef, *_train_state(adapters, tx, mesh), jax.device_put(base, base_shardings), base_shardings)


def _train_state(params, tx, mesh):
    p_shardings = param_shardings(params, mesh)
    params = jax.device_put(params, p_shardings)
    o_shardings = opt_state_shardings(tx, jax.eval_shape(tx.init, params), params, mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_shardings)(params)
    replicated = NamedSharding(mesh, P())
    state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated), params, opt_state)
    return state, TrainState(replicated, p_shardings, o_shardings)


def policy(graphdef, params, frozen) -> nnx.Module:
    """The model being trained: its parameters, plus the frozen base when they are LoRA adapters."""
    base = (frozen or {}).get("base")
    return nnx.merge(graphdef, params) if base is None else nnx.merge(graphdef, params, base)


def frozen_copy(tree, shardings):
    """A separate copy (the train state is donated, so a reference must not share its buffers)."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: LossFn, mesh: Mesh, state_shardings,
                    frozen_shardings, *, seed: int):
    """The jitted update; the state argument is donated."""
    replicated = NamedSharding(mesh, P())

    def step(state: TrainState, batch, frozen):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)

        def objective(params):
            model = with_dropout_keys(policy(graphdef, params, frozen), jax.random.fold_in(rng, _DROPOUT_STREAM))
            return loss_fn(model, batch, frozen, rng)

        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # the model keeps activations over the batch axes
            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": learning_rate(opt_state)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh), frozen_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_eval_step(graphdef, loss_fn: LossFn, mesh: Mesh, param_shardings_, frozen_shardings, *, seed: int):
    """``(params, batch, frozen) -> metrics`` (the loss included), no gradients."""

    def step(params, batch, frozen):
        loss, metrics = loss_fn(policy(graphdef, params, frozen), batch, frozen, jax.random.key(seed))
        return {**metrics, "loss": loss}

    return jax.jit(step, in_shardings=(param_shardings_, batch_sharding(mesh), frozen_shardings),
                   out_shardings=NamedSharding(mesh, P()))


def abstract_like(tree, shardings):
    """``ShapeDtypeStruct``s carrying the target shardings: what orbax restores into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def checkpoint_dir(config, workdir: str) -> str:
    """``config.checkpoint.dir`` (e.g. gs://bucket/run/checkpoints), or WORKDIR/checkpoints."""
    return config.checkpoint.get("dir") or os.path.join(workdir, "checkpoints")


class CheckpointError(UserError):
    pass


def _one_line(error: BaseException, limit: int = 160) -> str:
    text = " ".join(str(error).split(". See full TensorStore details")[0].split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


# What tensorstore's late read callbacks print when orbax gave up on a damaged checkpoint and closed
# its event loop: hundreds of identical tracebacks around the one error that matters.
_LOOP_NOISE = re.compile(r"^\s*(\^+)?\s*$|Traceback \(most recent call last\):|asyncio/base_events\.py|"
                         r"self\._check_closed\(\)|RuntimeError\('Event loop is closed'\)|Event loop is closed|"
                         r"sys\.meta_path is None")


@contextlib.contextmanager
def _without_loop_noise():
    """Hold back stderr while restoring; on failure drop the closed-loop noise and keep the rest."""
    real, held = sys.stderr, io.StringIO()
    failed = []
    sys.stderr = held
    try:
        yield failed
    finally:
        if failed:
            _silence_abandoned_reads()
            time.sleep(0.5)  # reads still in flight when orbax gave up report here
            gc.collect()  # and their abandoned tasks, now
        sys.stderr = real
        lines = held.getvalue().splitlines(keepends=True)
        real.write("".join(x for x in lines if not (failed and _LOOP_NOISE.search(x))))
        real.flush()


def _silence_abandoned_reads():
    """The reads orbax abandoned also report when collected ("Task exception was never retrieved",
    "Exception ignored in: <coroutine ...>"), up to interpreter exit; only those are dropped."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _LOOP_NOISE.search(str(unraisable.exc_value)) and "reading array index" not in str(unraisable.exc_value):
            previous(unraisable)

    sys.unraisablehook = hook


class Checkpoints:
    """orbax ``CheckpointManager``: the train state plus a JSON blob (data iterator position, counters).

    Saves every ``every`` steps and at the end, keeps the last ``keep``, writes asynchronously.
    A checkpoint only becomes visible once complete, so a run killed mid-save resumes from the
    previous one; one damaged later (truncated files, a missing item) is reported and skipped.
    """

    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        self.every = every
        self.directory = directory if "://" in directory else os.path.abspath(directory)  # gs://... stays remote
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save),
        )

    def restore(self, abstract_state) -> tuple[Any, dict] | None:
        """The newest readable checkpoint; unreadable newer ones are reported (one line each) and deleted,
        as the resumed run writes those steps again. None readable: ``CheckpointError``, nothing deleted."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        unreadable = []
        for step in steps:
            with _without_loop_noise() as failed:
                try:
                    out = self.manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
                except Exception as e:  # noqa: BLE001 - whatever makes a checkpoint unreadable, the next is tried
                    failed.append(e)
            if failed:
                reason = _one_line(failed[0])
                unreadable.append((step, reason))
                print(f"checkpoint step {step} at {self.directory}/{step} is unreadable ({reason}); "
                      "trying the previous one", file=sys.stderr)
                continue
            for bad, _ in unreadable:
                self.manager.delete(bad)
            return out["state"], out["extra"]
        if unreadable:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory} (steps {[s for s, _ in unreadable]}; newest: "
                f"{unreadable[0][1]}). If the config changed (model, mesh, optimizer), use the old config or a new "
                "workdir; to start over, delete that directory.")
        return None

    def maybe_save(self, step: int, state, extra: dict, *, force: bool = False) -> bool:
        if not force and (self.every <= 0 or step % self.every):
            return False
        if self.manager.latest_step() == step:
            return False
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=True)
        return True

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _open_log(path: str, start_step: int):
    """A JSONL log opened for appending, keeping only rows up to ``start_step`` (none on a fresh run)."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            kept = [line for line in f if start_step > 0 and json.loads(line)["step"] <= start_step]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)
    return open(path, "a", encoding="utf-8")


def _wandb_run(workdir: str, config):
    """The workdir's Weights & Biases run: one id per workdir (kept in ``wandb_run_id``), so a resumed
    run continues the same W&B run; its files go under ``WORKDIR/wandb``."""
    import wandb

    from sail_jax.workdir import flatten

    id_path = os.path.join(workdir, "wandb_run_id")
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with open(id_path, "w") as f:
            f.write(run_id)
    log = config.logging
    return wandb.init(project=log.get("wandb_project") or "sail-jax", entity=log.get("wandb_entity") or None,
                      name=log.get("wandb_name") or os.path.basename(os.path.abspath(workdir)), id=run_id,
                      resume="allow", dir=workdir, config=flatten(config))


def _cell(value) -> str:
    """A Markdown table cell: floats to 3 decimals, text on one line with its pipes escaped."""
    text = f"{value:.3f}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


class MetricLogger:
    """``metrics.jsonl`` (one object per line: step, split, metrics), ``completions.jsonl`` (one sampled
    completion per line, at evaluations) and TensorBoard events (scalars, and completions as text).

    Only process 0 writes; values are fetched to host floats here. A run resumed from step
    ``start_step`` keeps the rows up to that step and drops later ones (they are logged again), so
    the files never hold two histories.
    """

    def __init__(self, workdir: str, *, start_step: int = 0, enabled: bool | None = None, config=None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._file = self._tb = self._wandb = None
        self.workdir, self.start_step, self._completions = workdir, start_step, None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._file = _open_log(os.path.join(workdir, "metrics.jsonl"), start_step)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            if config is not None and config.get("logging", {}).get("wandb", False):
                self._wandb = _wandb_run(workdir, config)

    def write_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Sampled completions (prompt, reference and policy responses with their rewards): a line each
        in completions.jsonl, and one Markdown table as TensorBoard text ``eval/completions``."""
        if not self.enabled or not rows:
            return
        if self._completions is None:
            self._completions = _open_log(os.path.join(self.workdir, "completions.jsonl"), self.start_step)
        for row in rows:
            self._completions.write(json.dumps({"step": int(step), **row}, ensure_ascii=False) + "\n")
        self._completions.flush()
        header = list(rows[0])
        table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        table += ["| " + " | ".join(_cell(r[k]) for k in header) + " |" for r in rows]
        self._tb.add_text("eval/completions", "\n".join(table), int(step))
        if self._wandb is not None:
            import wandb

            table = wandb.Table(columns=header, data=[[r[k] for k in header] for r in rows])
            self._wandb.log({"eval/completions": table}, step=int(step))

    def write(self, step: int, metrics: dict[str, Any], split: str = "train") -> dict[str, float]:
        values = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
        if self.enabled:
            self._file.write(json.dumps({"step": int(step), "split": split, "time": time.time(), **values}) + "\n")
            self._file.flush()
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", v, int(step))
            if self._wandb is not None:
                self._wandb.log({f"{split}/{k}": v for k, v in values.items()}, step=int(step))
        return values

    def close(self):
        if self.enabled:
            self._file.close()
            self._tb.close()
            if self._completions is not None:
                self._completions.close()
            if self._wandb is not None:
                self._wandb.finish()


def mean_metrics(batches: list[dict[str, Any]], weights: list[float]) -> dict[str, float]:
    """Weighted mean of per-batch metric dicts (weights: valid rows per batch)."""
    total = sum(weights)
    if total == 0:
        return {}
    host = jax.device_get(batches)
    return {k: sum(float(b[k]) * w for b, w in zip(host, weights)) / total for k in host[0]}
