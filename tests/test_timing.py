"""Honest step times (the clock waits for the step's outputs) and the CLI's persistent compilation
cache, on real runs of the CLI."""

import json
import os
import subprocess
import sys

import pytest
from conftest import dpo_command, synthetic_pairs, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("timing")
    return {"model": tiny_checkpoint, "train": write_jsonl(root / "train.jsonl", synthetic_pairs(64, 1)),
            "eval": write_jsonl(root / "eval.jsonl", synthetic_pairs(16, 2))}


def _run(cmd, cache):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["XDG_CACHE_HOME"] = str(cache)  # the per-user default folder, inside the test's own
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def _step_seconds_against_wall_time(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) >= 8 and all(r["time/step_seconds"] > 0 for r in train)
    return sum(r["time/step_seconds"] for r in train[1:]), train[-1]["time"] - train[0]["time"]


def test_offline_step_seconds_add_up_to_the_wall_time_and_the_cache_fills(data, tmp_path):
    workdir, cache = tmp_path / "dpo", tmp_path / "cache"
    _run(dpo_command(workdir, data["model"], data["train"], data["eval"], "--config.steps=16",
                     "--config.log_every=1", "--config.eval_every=100", "--config.checkpoint.every=0"), cache)
    summed, wall = _step_seconds_against_wall_time(workdir)
    assert abs(summed - wall) <= 0.1 * wall, (summed, wall)
    assert any((cache / "sail-jax" / "xla").iterdir())  # compiled programs, for the next run of this config
    off = tmp_path / "off-cache"
    _run(dpo_command(tmp_path / "dpo-off", data["model"], data["train"], data["eval"], "--config.steps=2",
                     "--config.compilation_cache=off"), off)
    assert not (off / "sail-jax").exists()


def test_online_step_seconds_and_generation_share_add_up_to_the_wall_time(data, tmp_path):
    workdir = tmp_path / "sail"
    _run([sys.executable, "-m", "sail_jax.cli", "--config=configs/sail_pp.py", f"--workdir={workdir}",
          f"--config.model.path={data['model']}", f"--config.data.train_path={data['train']}",
          f"--config.data.eval_path={data['eval']}", "--config.data.max_prompt_length=40",
          "--config.data.max_response_length=12", "--config.steps=12",
          "--config.batch_size=8", "--config.eval_batch_size=16", "--config.eval_every=100", "--config.log_every=1",
          "--config.checkpoint.every=0"], tmp_path / "cache")
    summed, wall = _step_seconds_against_wall_time(workdir)
    assert abs(summed - wall) <= 0.1 * wall, (summed, wall)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert all(0 < r["gen/time_share"] < 1 for r in rows if r["split"] == "train")
