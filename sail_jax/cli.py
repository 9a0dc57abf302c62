"""``sail-jax --config=configs/<recipe>.py --workdir=DIR [--config.key=value ...]``."""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config, --workdir, --config.<key>=...")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 brings it back
    from sail_jax.recipes import get_recipe

    config, workdir = _CONFIG.value, _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.txt"), "w") as f:
        f.write(str(config))  # the resolved config, overrides included
    get_recipe(config.recipe)(config, workdir)


def main():
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(_main)


if __name__ == "__main__":
    main()
