"""Two JAX processes on localhost (4 CPU devices each, gloo collectives) against one process with 8.

DPO steps through the CLI give the same losses and the same exported weights; a checkpoint written
by the pair is resumed by the pair; sampling on a mesh spanning both processes gives the same tokens;
the SAIL loop (all three online routes) logs the same losses and evaluations; a built-in task's files,
which a multi-process run cannot build, come from a one-process `sail-jax task`.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

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


def _run(args, processes: int, timeout: int = 300, check: bool = True) -> list[tuple[int, str]]:
    """``args`` as one process with 8 CPU devices, or as ``processes`` processes sharing 8; each one's
    exit code and output."""
    if processes == 1:
        out = subprocess.run([sys.executable, *args], env=_env(8), cwd=REPO, capture_output=True, text=True,
                             timeout=timeout)
        results = [(out.returncode, out.stdout + out.stderr)]
    else:
        port = _free_port()
        procs = [subprocess.Popen([sys.executable, *args, *_process_flags(args, port, processes, i)],
                                  env=_env(8 // processes), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for i in range(processes)]
        results = [(p.returncode, out) for p, out in ((p, p.communicate(timeout=timeout)[0]) for p in procs)]
    for code, out in results if check else ():
        assert code == 0, out[-3000:]
    return results


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


def test_a_signal_to_one_process_stops_both_at_one_step_and_the_pair_resumes(tiny_checkpoint, tmp_path):
    """SIGTERM reaches one worker of a slice: both save the same step (JAX's preemption sync point)
    and exit 143, then the pair resumes to the uninterrupted pair's losses and weights, bitwise."""
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(64))
    uninterrupted, pair = tmp_path / "uninterrupted", tmp_path / "pair"
    _run(_dpo_args(tiny_checkpoint, data, uninterrupted, 60), processes=2)
    args, port = [*_dpo_args(tiny_checkpoint, data, pair, 60), "--config.checkpoint.every=0"], _free_port()
    procs = [subprocess.Popen([sys.executable, *args, *_process_flags(args, port, 2, i)], env=_env(4), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    metrics, deadline = pair / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and procs[1].poll() is None:
        if metrics.exists() and metrics.read_text().count('"train"') >= 5:
            procs[1].send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    stops = set()
    for p, out in zip(procs, outputs):
        assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in out, out[-3000:]
        stops.add(int(out.split("stopped by SIGTERM after step ")[1].split(";")[0]))
    [stop] = stops
    assert stop < 60 and sorted(p for p in os.listdir(pair / "checkpoints") if p.isdigit()) == [str(stop)]
    _run(_dpo_args(tiny_checkpoint, data, pair, 60), processes=2)
    assert _losses(pair) == _losses(uninterrupted) and len(_losses(pair)) == 60
    a, b = (load_file(str(w / "export" / "model.safetensors")) for w in (uninterrupted, pair))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_two_processes_run_the_sail_loop_like_one(tiny_checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(64))
    common = ["-m", "sail_jax.cli", "--config=configs/sail_pp.py", f"--config.model.path={tiny_checkpoint}",
              f"--config.data.train_path={data}", f"--config.data.eval_path={data}", "--config.sail.p_dp=0.2",
              "--config.sail.p_pp=0.2", "--config.sail.p_pr=0.2", "--config.reward.kind=builtin",  # named: own data
              "--config.steps=3", "--config.batch_size=16",
              "--config.eval_batch_size=16", "--config.log_every=1", "--config.eval_every=3",
              "--config.checkpoint.every=0", "--config.mesh.data=2", "--config.data.max_prompt_length=40",
              "--config.data.max_response_length=12"]
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


def test_a_built_in_task_comes_from_one_process_then_runs_on_two(tmp_path):
    task = ["--config=configs/sail_pp.py", f"--config.task.dir={tmp_path / 'task'}", "--config.task.sft_steps=60",
            "--config.task.preference_train=64", "--config.task.preference_eval=16"]
    loop = ["-m", "sail_jax.cli", *task, f"--workdir={tmp_path / 'run'}", "--config.steps=1", "--config.batch_size=8",
            "--config.eval_batch_size=16", "--config.checkpoint.every=0"]
    for code, out in _run(loop, processes=2, check=False):  # no files yet: refused, naming the way out
        assert code == 2 and "error: task files in" in out and "`sail-jax task`" in out, out[-3000:]
        assert "Traceback" not in out
    [(_, built)] = _run(["-m", "sail_jax.cli", "task", *task, f"--workdir={tmp_path / 'build'}"], processes=1)
    assert str(tmp_path / "task") in built.splitlines()  # its folder, printed on stdout
    assert not (tmp_path / "build").exists()  # the files went to task.dir
    for _, out in _run(loop, processes=2):
        assert "building the builtin task" not in out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final"]["kl"] >= 0
