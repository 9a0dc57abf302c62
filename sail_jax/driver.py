"""The one training loop every recipe runs: resume, steps, logging, evaluation, checkpoints, and a
clean stop on SIGTERM/SIGINT.

A recipe supplies a ``Trainer`` (its state and what one step, one evaluation and a checkpoint's extra
data are); ``drive`` owns everything around it, so the offline recipes and the SAIL loop resume,
log, checkpoint and stop the same way.

Stopping: the first SIGTERM (what a preempted TPU VM or a GPU scheduler sends) or SIGINT (Ctrl-C)
finishes the current step (or generation block), saves a checkpoint and raises ``Stopped``; a second
one exits at once.
In a multi-process run the processes agree on the step to stop at (a signal seen by any process
stops all), since saving is collective: through JAX's preemption sync point, which the
coordination service computes off the training path (no per-step device sync).
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time
from typing import Any, Protocol

import jax
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils
from tqdm import tqdm

from sail_jax.errors import Stopped, UserError
from sail_jax.train import Checkpoints, MetricLogger, abstract_like, checkpoint_dir


class Trainer(Protocol):
    state: Any  # TrainState: what checkpoints hold
    shardings: Any  # its shardings (what a checkpoint is restored into)

    def step(self, step: int) -> dict[str, Any]: ...  # one update; its metrics

    def evaluate(self) -> dict[str, float]: ...  # the current policy's eval metrics ({} if none)

    def checkpoint_extra(self) -> dict: ...  # host state beside the train state (data position, ...)

    def load_extra(self, extra: dict) -> None: ...

    # Optional: ``can_checkpoint(done) -> bool``, False where a checkpoint would not resume exactly
    # (the SAIL loop between generation blocks); a stop then waits for the next step where it is True.


# The coordination-service key JAX's preemption sync manager watches (its SIGTERM notifier writes it;
# xla/pjrt/distributed/preemption). Our handlers replace that notifier, so they write the key themselves;
# tests/test_multihost.py checks the protocol end to end on the pinned jax.
_PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


class StopSignals:
    """SIGTERM/SIGINT handlers for the loop's duration: the first asks for a stop, a second exits.

    Multi-process: the first signal a process sees is posted as a preemption notice to JAX's
    coordination service, whose sync protocol picks one step at which every process stops
    (``reached_preemption_sync_point``, a local check on each step)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._sync = jax.process_count() > 1
        if self._sync and jax_distributed.global_state.preemption_sync_manager is None:
            raise UserError("a multi-process run needs JAX's preemption service to stop cleanly; do not set "
                            "jax_enable_preemption_service=False")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\n{name} again: exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{name}: saving a checkpoint at the next step boundary, then stopping (send it again to exit "
              "at once)", file=sys.stderr, flush=True)
        if self._sync:
            try:  # the value is the "death time" the protocol plans for: now, stop as soon as possible
                jax_distributed.global_state.client.key_value_set(
                    _PREEMPTION_NOTICE_KEY, datetime.datetime.now(datetime.timezone.utc).isoformat())
            except Exception:  # noqa: BLE001 - another process posted it first: the protocol already runs
                pass

    def requested(self, done: int) -> int | None:
        """The signal to stop on after step ``done``, at the same step on every process (called once per
        step on all of them). A process that saw no signal stops on SIGTERM's behalf."""
        if not self._sync:
            return self.signum
        if multihost_utils.reached_preemption_sync_point(done):
            return self.signum or signal.SIGTERM
        return None


def drive(trainer: Trainer, config, workdir: str, *, desc: str,
          step0: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """Train ``trainer`` to ``config.steps`` from the workdir's newest readable checkpoint; returns the
    last evaluation (of the final policy, also when there was nothing left to train). ``step0``:
    rows logged at step 0 of a fresh run, by split (the initial evaluation, the data's skip counts)."""
    ckpt = Checkpoints(checkpoint_dir(config, workdir), every=config.checkpoint.every, keep=config.checkpoint.keep,
                       async_save=config.checkpoint.get("async_save", True))
    restored = ckpt.restore(abstract_like(trainer.state, trainer.shardings))
    if restored is not None:
        trainer.state, extra = restored
        trainer.load_extra(extra)
    start, steps = int(trainer.state.step), int(config.steps)
    if start > steps:
        ckpt.close()
        raise UserError(f"{ckpt.directory} holds step {start}, past config.steps={steps}; raise steps to at least "
                        f"{start} or use a new workdir")
    if start:
        print(f"{desc}: resuming from step {start} of {steps} ({ckpt.directory})", file=sys.stderr, flush=True)
    logger = MetricLogger(workdir, start_step=start, config=config)
    for split, values in (step0 or {}).items():
        if start == 0 and values:
            logger.write(0, values, split=split)
    last: dict[str, float] | None = None
    bar = tqdm(total=steps, initial=start, disable=jax.process_index() != 0, desc=desc, dynamic_ncols=True)
    clock = StepClock(start)
    pending = None  # a stop agreed on at a step where the trainer cannot checkpoint
    with StopSignals() as signals:
        for step in range(start, steps):
            metrics = trainer.step(step)
            done = step + 1
            if done % config.log_every == 0 or done == steps:
                values = logger.write(done, {**metrics, **clock.lap(done, metrics)})
                bar.set_postfix(_train_postfix(values))
            if done % config.eval_every == 0 or done == steps:
                clock.pause(trainer.state)
                last = trainer.evaluate()
                if last:
                    last = logger.write(done, last, split="eval")
                    bar.set_postfix(_eval_postfix(last))
                if hasattr(trainer, "completions"):
                    logger.write_completions(done, trainer.completions())
                clock.resume()
            pending = signals.requested(done) or pending
            stop = pending if getattr(trainer, "can_checkpoint", lambda _: True)(done) else None  # else: later
            final = done == steps and config.checkpoint.get("final", True)
            ckpt.maybe_save(done, trainer.state, trainer.checkpoint_extra(), force=final or stop is not None)
            bar.update(1)
            if stop is not None and done < steps:
                bar.close()
                ckpt.close()
                logger.close()
                raise Stopped(stop, done, ckpt.directory)
    bar.close()
    ckpt.close()
    logger.close()
    if last is None:  # nothing was left to train (a finished run resumed): evaluate what it ended with
        last = trainer.evaluate()
    return last


class StepClock:
    """Honest step times under asynchronous dispatch: a step's outputs are waited for
    (``block_until_ready``) before the clock reads, at logged steps only (between them the host runs
    ahead of the device, as it should). ``time/step_seconds`` is the mean wall time per step since the
    last logged step, evaluations left out; ``steps_per_second`` is the run's mean so far."""

    def __init__(self, start: int):
        self.start, self.last_step = start, start
        self.t0 = self.mark = time.perf_counter()
        self.paused = self.paused_total = 0.0
        self._pause_at: float | None = None

    def lap(self, done: int, outputs) -> dict[str, float]:
        jax.block_until_ready(outputs)
        now = time.perf_counter()
        out = {"steps_per_second": (done - self.start) / max(now - self.t0 - self.paused_total, 1e-9)}
        if "time/step_seconds" not in outputs:  # the online loop times its own steps (with generation)
            out["time/step_seconds"] = (now - self.mark - self.paused) / max(done - self.last_step, 1)
        self.mark, self.last_step, self.paused = now, done, 0.0
        return out

    def pause(self, state) -> None:
        """Before an evaluation: the steps it follows finish first, on the clock."""
        jax.block_until_ready(state)
        self._pause_at = time.perf_counter()

    def resume(self) -> None:
        spent = time.perf_counter() - self._pause_at
        self.paused += spent
        self.paused_total += spent


def _train_postfix(values: dict[str, float]) -> dict[str, str]:
    out = {"loss": f"{values['loss']:.4f}"}
    if "gen/time_share" in values:
        out["gen"] = f"{values['gen/time_share']:.0%}"
    return out


def _eval_postfix(values: dict[str, float]) -> dict[str, str]:
    if "reward" in values:
        return {"reward": f"{values['reward']:.3f}", "kl": f"{values['kl']:.2f}"}
    return {"eval_loss": f"{values['loss']:.4f}"} if "loss" in values else {}
