"""``sail-jax --config=configs/<recipe>.py --workdir=DIR [--config.key=value ...]``."""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "Multi-process: HOST:PORT of process 0 (with the next two).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-process: how many processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-process: this process's index, 0..num_processes-1.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Multi-host Cloud TPU slice: join all workers (auto-detected).")


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config, --workdir, --config.<key>=...")
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
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(_main)


if __name__ == "__main__":
    main()
