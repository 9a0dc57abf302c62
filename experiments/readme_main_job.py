"""Rerun README's main job and write what it printed into README's main-job block.

    python experiments/readme_main_job.py    # runs the main command in a fresh workdir, updates README.md

The command is read from README itself (the first ``sail-jax --config=...`` line of the main-job
install command), so the block always shows what that command prints; tests/test_readme.py checks the
block against the current configs (variant name, health bounds).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
BEGIN, END = "<!-- main-job output: written by experiments/readme_main_job.py -->", "<!-- end main-job output -->"
HEADER = re.compile(r"^\s+reward\s+win rate vs SFT")


def main_command(readme: str) -> list[str]:
    """The ``sail-jax ...`` part of README's main-job install command, as argv."""
    line = next(x for x in readme.splitlines() if "pip install" in x and "sail-jax --config=" in x)
    return shlex.split(line[line.index("sail-jax --config="):])


def printed_block(stdout: str) -> str:
    """The summary the run printed: from the table header to the end (progress bars excluded)."""
    lines = stdout.splitlines()
    start = max(i for i, x in enumerate(lines) if HEADER.match(x))
    return "\n".join(lines[start:]).rstrip()


def readme_block(readme: str) -> str:
    return readme[readme.index(BEGIN) + len(BEGIN):readme.index(END)]


def _cpu_name() -> str:
    """The processor's model name: the printed digits depend on it (XLA's CPU kernels round differently
    on different processors, and the sampler's draws then diverge)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    argv = main_command(readme)
    with tempfile.TemporaryDirectory() as tmp:
        argv = [a.replace("runs/sail", os.path.join(tmp, "sail")) if a.startswith("--workdir") else a for a in argv]
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", "sail_jax.cli", *argv[1:]], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
        seconds = time.time() - t0
    block = printed_block(out)
    stamp = (f"What it printed on {datetime.date.today().isoformat()} ({_cpu_name()}, {platform.machine()}, "
             f"{os.cpu_count()} cores, {seconds:.0f} s after the install):")
    new = f"{BEGIN}\n{stamp}\n\n```\n{block}\n```\n"
    readme = readme.replace(BEGIN + readme_block(readme), new)
    with open(README, "w", encoding="utf-8") as f:
        f.write(readme)
    print(new)


if __name__ == "__main__":
    main()
