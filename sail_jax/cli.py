"""``sail-jax --config=configs/<recipe>.py --workdir=DIR [--config.key=value ...]``, and
``sail-jax plan --config=... [--target=v5e-32]``: the per-device memory plan of a config (sail_jax.plan), and
``sail-jax task --config=... --workdir=DIR``: build a SAIL config's task files in one process (what a
multi-host slice, which cannot build them, is given; tpu_scripts/launch.sh --task_bucket does this), and
``sail-jax show --config=...``: the resolved config, a key a line with its meaning; ``--help`` lists
recipes, shipped configs and subcommands.

A run goes through ``sail_jax.launch`` (validation, the workdir's lock, resume checks, the recipe); the
same command on a finished run prints its saved summary. User errors print one message and exit 2 (``--debug``: with the traceback); a run
stopped by SIGTERM/SIGINT saves a checkpoint and exits 128 + the signal number.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False, "Resume a run although its config changed (the "
                                  "changed keys are printed); cadence keys (steps, logging, eval) may always change.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of user errors (config, data, paths, checkpoints).")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "Multi-process: HOST:PORT of process 0 (with the next two).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-process: how many processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-process: this process's index, 0..num_processes-1.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Multi-host Cloud TPU slice: join all workers (auto-detected).")
_TARGET = flags.DEFINE_string("target", "", "plan: slices/GPUs to plan for, comma-separated (default: the config's "
                              "plan_targets), e.g. v4-8,v5e-8,1xH100.")


def _fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _loaded_config():
    """The config; a config file that failed to load (ml_collections defers that error) is a user error."""
    from sail_jax.errors import UserError

    config = _CONFIG.value
    try:
        config.get("recipe")  # the first use is what raises
        return config
    except OSError as e:
        raise UserError(" ".join(str(e).replace("Configuration is not available because of an earlier failure to load: ",
                                                "").split())) from None


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def help_text() -> str:
    """What ``sail-jax --help`` prints: the recipes, the shipped configs, the subcommands, overrides."""
    import ast

    from sail_jax.recipes import RECIPES

    configs = []
    if os.path.isdir(CONFIGS_DIR):
        for name in sorted(os.listdir(CONFIGS_DIR)):
            if name.endswith(".py"):
                with open(os.path.join(CONFIGS_DIR, name), encoding="utf-8") as f:
                    doc = ast.get_docstring(ast.parse(f.read())) or ""
                first = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].split(" — ")[0].rstrip(".")
                first = first if len(first) <= 110 else first[:109] + "…"  # its first sentence, one line
                configs.append(f"  configs/{name:<26} {first}")
    return "\n".join([
        "usage: sail-jax [plan|task|show] --config=CONFIG[:ARG] [--workdir=DIR] [--config.KEY=VALUE ...]",
        "",
        "  (no subcommand)  run the config's recipe in --workdir (a rerun resumes; a finished run prints its summary)",
        "  show             print the resolved config, a key a line with its meaning",
        "  plan             per-device memory plan for --target (e.g. v5e-8,1xH100) or the config's plan_targets",
        "  task             build a SAIL config's built-in task files in one process (for multi-host runs)",
        "",
        f"recipes (config.recipe): {', '.join(sorted(RECIPES))}",
        "",
        "shipped configs" + ("" if configs else f" (none found: {CONFIGS_DIR} is missing)") + ":",
        *configs,
        "",
        "Any key can be overridden: --config.optim.learning_rate=1e-6 --config.model.path=my_model",
        "(`sail-jax show --config=...` lists the keys). From Python: sail_jax.run(config, workdir).",
        "Other flags: --workdir, --allow_config_change, --debug, --multihost, --coordinator, --num_processes,",
        "--process_id, --target (plan); --helpfull lists every flag.",
    ])


def _show(config) -> None:
    from sail_jax.config_reference import describe
    from sail_jax.configs import fill_defaults

    fill_defaults(config)  # what a run would use
    print(describe(config))


def _plan(config) -> None:
    from sail_jax.errors import UserError
    from sail_jax.plan import make_plan, parse_target

    names = [t for t in (_TARGET.value or config.get("plan_targets", "")).split(",") if t]
    if not names:
        raise UserError("plan: name a target (--target=v5e-8) or set plan_targets in the config")
    for name in names:
        try:
            plan = make_plan(config, target=parse_target(name))
        except ValueError as e:  # a target the config's mesh or batch cannot use, an unknown model or target
            raise UserError(f"plan for {name}: {e}") from None
        mesh = " x ".join(f"{k} {v}" for k, v in plan.mesh.items())
        print(f"\n== {name}: mesh {mesh}, batch {config.batch_size} ==\n{plan.table()}")


def _task(config, workdir: str) -> None:
    """Build the task files of a SAIL config (single process) and print their folder last."""
    from sail_jax.errors import UserError
    from sail_jax.tasks.prepare import prepare_task
    from sail_jax.validation import validate_config

    validate_config(config)
    if config.get("recipe") != "sail" or config.model.path:
        raise UserError("task: only a SAIL config without model.path builds task files; this one reads its model "
                        "and data from the paths it names")
    paths = prepare_task(config, workdir)
    print(os.path.dirname(paths["train"]))


def _train(config, workdir: str) -> None:
    from sail_jax import distributed
    from sail_jax.launch import launch

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _MULTIHOST.value)
    launch(config, workdir, allow_config_change=_ALLOW_CHANGE.value)


def _main(argv):
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 brings it back
    from sail_jax.errors import Stopped, UserError

    try:
        if argv[1:] == ["plan"]:
            return _plan(_loaded_config())
        if argv[1:] == ["show"]:
            return _show(_loaded_config())
        if len(argv) > 1 and argv[1:] != ["task"]:
            raise UserError(f"unexpected arguments {argv[1:]}; use `sail-jax [plan|task|show] --config=... "
                            "--workdir=...` (sail-jax --help)")
        if not _WORKDIR.value:
            raise UserError("--workdir is required (where checkpoints, logs and the export go)")
        if argv[1:] == ["task"]:
            if _MULTIHOST.value or _NUM_PROCESSES.value > 1:
                raise UserError("task: build the task files in one process (drop --multihost/--num_processes)")
            return _task(_loaded_config(), _WORKDIR.value)
        _train(_loaded_config(), _WORKDIR.value)
    except UserError as e:
        if _DEBUG.value:
            raise
        _fail(str(e))
    except Stopped as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before the training loop (which saves and stops on its own)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with one line per mistake instead of chained tracebacks."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - config files and overrides fail in many ways; all are user errors
        if "--debug" in argv:
            raise
        chain = [e]
        while chain[-1].__cause__ or chain[-1].__context__:
            chain.append(chain[-1].__cause__ or chain[-1].__context__)
        innermost = chain[-1]
        message = str(e) if isinstance(e, flags.Error) else str(innermost)
        if "Traceback" in message:  # a config file that raised: its own error, after the flag
            message = f"{message.split(': ')[0]}: {type(innermost).__name__}: {innermost}"
        if isinstance(innermost, (AttributeError, KeyError)):  # an override naming a key the config lacks
            key = str(innermost).strip("'\"").split("'")[0].split()[0] if str(innermost) else "?"
            used = [a.split("=")[0] for a in argv if a.startswith("--config.") and f".{key}." in a.split("=")[0] + "."]
            guess = next((m.group(1) for m in map(re.compile(r'Did you mean "([^"]+)"').search, map(str, chain)) if m),
                         None)
            message = (f"{used[0] if used else '--config.*'}: the config has no key {key!r}."
                       + (f' Did you mean "{guess}"?' if guess else ""))
        elif isinstance(e, flags.UnrecognizedFlagError) and "config." in message:
            message += " (the config has no such key; see the config file and sail_jax/configs.py)"
        _fail(" ".join(message.split()))


# XLA:CPU's default schedule trades memory for parallelism: at 8 rows of 1024 tokens its DPO step of
# SmolLM2-135M asked for 43 GB; the memory-minimising schedule (what TPU and GPU compilers do) runs it
# in a few. Plans are computed with it too. A run that sets the flag itself keeps its own value.
_CPU_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler"


def main():
    if _CPU_SCHEDULER not in os.environ.get("XLA_FLAGS", ""):  # must be set before jax starts
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CPU_SCHEDULER}=false".strip()
    if {"--help", "-h", "--helpshort"} & set(sys.argv[1:]):
        print(help_text())
        return
    if sys.argv[1:2] in (["plan"], ["show"]):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # computed on the host; skip the accelerator probe
    flags.mark_flags_as_required(["config"])
    app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
