"""docs/quickstart.md, run as a newcomer would: every ``sail-jax`` command and the notebook cell of the
page, verbatim, offline (the Hub ids name a tiny model and dataset this test puts in a Hugging Face cache,
HF_HUB_OFFLINE=1), scaled down only by extra flags appended to each command; the TPU VM commands by
--dry-run. The install line is README's, which CI runs on a fresh machine."""

import os
import re
import shlex
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import hub_cache, synthetic_pairs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(REPO, "docs", "quickstart.md")
# Test-only scale: two updates of 8 rows, evaluated once (the page's runs are the real thing's length).
SMALL = ["--config.steps=2", "--config.batch_size=8", "--config.eval_batch_size=8", "--config.log_every=1",
         "--config.eval_every=2", "--config.checkpoint.every=0"]
# and, for the online loop, answers of 12 tokens from the tiny model (the real-data default is 256)
SHORT_ANSWERS = ["--config.data.max_response_length=12"]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", open(PAGE, encoding="utf-8").read(), flags=re.S)


def commands(block: str) -> list[list[str]]:
    """Each command of a bash block as argv (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]


def conversations(rows):
    """TRL's implicit-prompt conversational rows, as trl-lib/ultrafeedback_binarized stores them."""
    def convo(r, side):
        return [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[side]}]

    return {"prompt_id": [str(i) for i in range(len(rows))], "chosen": [convo(r, "chosen") for r in rows],
            "rejected": [convo(r, "rejected") for r in rows], "score_chosen": [8.0] * len(rows),
            "score_rejected": [3.0] * len(rows)}


@pytest.fixture
def newcomer(tmp_path, tiny_checkpoint):
    """A working folder (configs/ as in a clone) and a Hugging Face cache holding the page's Hub ids."""
    cache = tmp_path / "hf" / "hub"
    hub_cache(str(cache), "Qwen/Qwen2.5-0.5B-Instruct", tiny_checkpoint)
    data = tmp_path / "dataset"
    os.makedirs(data / "data")
    for split, rows in (("train", synthetic_pairs(16, seed=1)), ("test", synthetic_pairs(8, seed=2))):
        pq.write_table(pa.table(conversations(rows)), str(data / "data" / f"{split}-00000-of-00001.parquet"))
    hub_cache(str(cache), "trl-lib/ultrafeedback_binarized", str(data), repo_type="dataset")
    work = tmp_path / "work"
    os.makedirs(work)
    os.symlink(os.path.join(REPO, "configs"), work / "configs")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "SAIL_JAX_CACHE": str(tmp_path / "c"),
           "PYTHONPATH": REPO}
    return work, env


@pytest.mark.slow
def test_every_command_of_the_quickstart_runs(newcomer):
    work, env = newcomer
    ran = []
    for block in blocks("bash"):
        for argv in commands(block):
            if argv[0] != "sail-jax":
                continue
            online = SHORT_ANSWERS if argv[1].startswith("--config=configs/sail") else []
            out = subprocess.run([sys.executable, "-m", "sail_jax.cli", *argv[1:], *SMALL, *online], cwd=work,
                                 env=env, capture_output=True, text=True)
            assert out.returncode == 0, f"{shlex.join(argv)}\n{out.stderr[-3000:]}"
            ran.append(argv[1])
    assert ran == ["--config=configs/dpo.py", "--config=configs/reward.py", "--config=configs/sail_pr.py"], ran
    assert os.path.exists(work / "runs" / "sail_pr" / "export" / "model.safetensors")
    # the notebook cell: the same page's Python, its run scaled down as the commands were
    [cell] = blocks("python")
    prelude = ("import sail_jax\n_run = sail_jax.run\n"
               "def _small(config, *args, **kwargs):\n"
               "    config.update(steps=2, batch_size=8, eval_batch_size=8, log_every=1, eval_every=2)\n"
               "    config.checkpoint.every, config.data.max_response_length = 0, 12\n"
               "    return _run(config, *args, **kwargs)\n"
               "sail_jax.run = _small\n")
    out = subprocess.run([sys.executable, "-c", prelude + cell + "\nprint('summary', sorted(summary))\n"], cwd=work,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "summary [" in out.stdout, out.stderr[-3000:]


def test_the_tpu_vm_commands_dry_run():
    [block] = [b for b in blocks("bash") if "tpu_scripts/" in b]
    env = dict(os.environ)
    scripts = []
    for argv in commands(block):
        if argv[0] == "export":
            env.update(a.split("=", 1) for a in argv[1:])
            continue
        assert argv[0].startswith("tpu_scripts/"), argv
        out = subprocess.run(["bash", os.path.join(REPO, argv[0]), "--dry-run", *argv[1:]], cwd=REPO, env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip(), f"{shlex.join(argv)}\n{out.stderr}"
        scripts.append(os.path.basename(argv[0]))
    assert scripts == ["create.sh", "setup.sh", "launch.sh", "logs.sh"]
