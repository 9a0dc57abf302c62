"""``sail-jax --config=configs/<recipe>.py --workdir=DIR [--config.key=value ...]``, and
``sail-jax plan --config=... [--target=v5e-32]``: the per-device memory plan of a config (sail_jax.plan)."""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "Multi-process: HOST:PORT of process 0 (with the next two).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-process: how many processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-process: this process's index, 0..num_processes-1.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Multi-host Cloud TPU slice: join all workers (auto-detected).")
_TARGET = flags.DEFINE_string("target", "", "plan: slices/GPUs to plan for, comma-separated (default: the config's "
                              "plan_targets), e.g. v4-8,v5e-8,1xH100.")


def _plan(config) -> None:
    from sail_jax.plan import make_plan, parse_target

    names = [t for t in (_TARGET.value or config.get("plan_targets", "")).split(",") if t]
    if not names:
        raise app.UsageError("plan: name a target (--target=v5e-8) or set plan_targets in the config")
    for name in names:
        plan = make_plan(config, target=parse_target(name))
        mesh = " x ".join(f"{k} {v}" for k, v in plan.mesh.items())
        print(f"\n== {name}: mesh {mesh}, batch {config.batch_size} ==\n{plan.table()}")


def _main(argv):
    if argv[1:] == ["plan"]:
        return _plan(_CONFIG.value)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use `sail-jax [plan] --config=... --workdir=...`")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (where checkpoints, logs and the export go)")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 brings it back
    from sail_jax import distributed
    from sail_jax.recipes import get_recipe

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _MULTIHOST.value)
    config, workdir = _CONFIG.value, _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    if distributed.is_main():
        with open(os.path.join(workdir, "config.txt"), "w") as f:
            f.write(str(config))  # the resolved config, overrides included
    get_recipe(config.recipe)(config, workdir)


def main():
    if sys.argv[1:2] == ["plan"]:
        # Plan with XLA's memory-minimising schedule on the host, as TPU and GPU compilers schedule
        # (the CPU default trades memory for parallelism). Must be set before jax starts.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
    flags.mark_flags_as_required(["config"])
    app.run(_main)


if __name__ == "__main__":
    main()
