"""Two JAX processes on localhost (4 CPU devices each, gloo collectives) against one process with 8.

DPO steps through the CLI give the same losses and the same exported weights; a checkpoint written
by the pair is resumed by the pair; sampling on a mesh spanning both processes gives the same tokens;
the SAIL loop (all three online routes) logs the same losses and evaluations.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import synthetic_pairs, write_jsonl
from safetensors.numpy import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(args, processes: int, timeout: int = 300):
    """``args`` as one process with 8 CPU devices, or as ``processes`` processes sharing 8."""
    if processes == 1:
        out = subprocess.run([sys.executable, *args], env=_env(8), cwd=REPO, capture_output=True, text=True,
                             timeout=timeout)
        assert out.returncode == 0, out.stderr[-3000:]
        return
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *args, *_process_flags(args, port, processes, i)], env=_env(8 // processes),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]


def _process_flags(args, port, processes, i):
    if args[0] == "-m":  # the CLI
        return [f"--coordinator=localhost:{port}", f"--num_processes={processes}", f"--process_id={i}"]
    return [f"localhost:{port}", str(processes), str(i)]


def _dpo_args(model, data, workdir, steps):
    return ["-m", "sail_jax.cli", "--config=configs/dpo.py", f"--workdir={workdir}", f"--config.model.path={model}",
            f"--config.data.train_path={data}", f"--config.steps={steps}", "--config.batch_size=8",
            "--config.log_every=1", "--config.checkpoint.every=2", "--config.checkpoint.async_save=False",
            "--config.optim.schedule=constant", "--config.optim.learning_rate=1e-2", "--config.mesh.data=2",
            "--config.mesh.fsdp=-1", "--config.data.max_prompt_length=40", "--config.data.max_length=48"]


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_two_processes_train_resume_and_sample_like_one(tiny_checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(64))
    single, pair = tmp_path / "single", tmp_path / "pair"
    _run(_dpo_args(tiny_checkpoint, data, single, 4), processes=1)
    _run(_dpo_args(tiny_checkpoint, data, pair, 2), processes=2)  # stops at step 2 with a checkpoint
    assert sorted(p for p in os.listdir(pair / "checkpoints") if p.isdigit()) == ["2"]
    _run(_dpo_args(tiny_checkpoint, data, pair, 4), processes=2)  # the pair resumes from it
    want, got = _losses(single), _losses(pair)
    assert sorted(got) == [1, 2, 3, 4] and len(set(want.values())) == 4
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)], rtol=1e-5)
    a, b = load_file(str(single / "export" / "model.safetensors")), load_file(str(pair / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-4, err_msg=name)  # all-reduce order

    from multihost_generate import main as generate_here

    generate_here(tiny_checkpoint, str(tmp_path / "one.npz"))  # 1 process: this one (8 devices, see conftest)
    _run([os.path.join(REPO, "tests", "multihost_generate.py"), tiny_checkpoint, str(tmp_path / "two.npz")], processes=2)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert one["tokens"].shape == (32, 6)
    np.testing.assert_array_equal(two["tokens"], one["tokens"])
    np.testing.assert_allclose(two["logprobs"], one["logprobs"], atol=1e-5)


def test_two_processes_run_the_sail_loop_like_one(tiny_checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(64))
    common = ["-m", "sail_jax.cli", "--config=configs/sail_pp.py", f"--config.model.path={tiny_checkpoint}",
              f"--config.data.train_path={data}", f"--config.data.eval_path={data}", "--config.sail.p_dp=0.2",
              "--config.sail.p_pp=0.2", "--config.sail.p_pr=0.2", "--config.steps=3", "--config.batch_size=16",
              "--config.eval_batch_size=16", "--config.log_every=1", "--config.eval_every=3",
              "--config.checkpoint.every=0", "--config.mesh.data=2", "--config.data.max_prompt_length=40"]
    _run([*common, f"--workdir={tmp_path / 'one'}"], processes=1)
    _run([*common, f"--workdir={tmp_path / 'two'}"], processes=2)
    rows = {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in ("one", "two")}
    assert [(r["step"], r["split"]) for r in rows["two"]] == [(r["step"], r["split"]) for r in rows["one"]] == [
        (0, "eval"), (0, "data"), (1, "train"), (2, "train"), (3, "train"), (3, "eval")]
    for a, b in zip(rows["one"], rows["two"]):
        for key in ("loss", "reward", "kl", "route/pr_frac", "labels/ties_dropped", "heldout/rewards/accuracies"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_incomplete_process_flags_are_refused():
    from sail_jax.distributed import initialize

    with pytest.raises(ValueError, match="give all three"):
        initialize(coordinator="localhost:1234", num_processes=2)
    assert initialize() is False
