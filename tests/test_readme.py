"""README's main-job block is the current main job's output: same variant, same command, healthy numbers.

The block is written by experiments/readme_main_job.py (which reruns the command); these checks make a
stale block (another variant, another command, a collapsed policy) fail CI.
"""

import importlib.util
import os
import re

from conftest import main_job_variant
from sail_jax.evaluate import health_problems

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("readme_main_job", os.path.join(REPO, "experiments",
                                                                                  "readme_main_job.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_main_command_is_the_main_job():
    script = _script()
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert script.main_command(readme) == ["sail-jax", "--config=configs/sail_pp.py", "--workdir=runs/sail"]


def test_readme_main_job_block_shows_the_current_variant_healthy():
    script = _script()
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    block = script.readme_block(readme)
    assert re.search(r"What it printed on \d{4}-\d{2}-\d{2} ", block), "the block carries the date of its run"
    printed = block.split("```")[1]
    assert script.printed_block(printed) == printed.strip("\n")  # exactly what the script extracts from a run
    row = next(line for line in printed.splitlines() if line.startswith(f"{main_job_variant()} (final)"))
    reward, win_rate, kl, distinct_2 = (float(x) for x in row.split()[-4:])
    assert health_problems({"reward": reward, "kl": kl, "distinct_2": distinct_2}) == [], row
    assert win_rate > 0.65, row
