"""Runs a researcher can trust, tested with real processes, signals and files: rerun of a finished run,
resume with a changed config, the workdir lock, checkpoint fallback, SIGTERM/SIGKILL and resume,
strict data, and user errors without tracebacks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import dpo_command, synthetic_pairs, write_jsonl
from safetensors.numpy import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": ""}  # one CPU device per run
STEPS = ("--config.steps=200", "--config.checkpoint.every=50", "--config.log_every=1", "--config.eval_every=100")


@pytest.fixture(scope="module")
def data(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"model": tiny_checkpoint, "train": write_jsonl(root / "train.jsonl", synthetic_pairs(64, 1)),
            "eval": write_jsonl(root / "eval.jsonl", synthetic_pairs(16, 2))}


def _cmd(data, workdir, *extra, train=None):
    return dpo_command(workdir, data["model"], train or data["train"], data["eval"], *STEPS, *extra)


def _run(cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def _same_export(a, b) -> bool:
    x, y = (load_file(str(p / "export" / "model.safetensors")) for p in (a, b))
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def _copy_unfinished(src, dst):
    """The finished run's workdir as it was before its end: no export, no summary."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "export")
    for name in ("summary.json", "summary.txt"):
        (dst / name).unlink()


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """The uninterrupted run every other run is compared with."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    out = _run(_cmd(data, workdir))
    assert out.returncode == 0, out.stderr[-2000:]
    return workdir


def test_rerun_of_a_finished_run_prints_its_summary_and_touches_nothing(data, finished):
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in finished.rglob("*")}
    out = _run(_cmd(data, finished))
    assert out.returncode == 0, out.stderr
    assert "holds a finished run of this config (200 steps)" in out.stdout
    assert (finished / "summary.txt").read_text() in out.stdout and "exported to" in out.stdout
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in finished.rglob("*")} == before


def test_resume_with_a_changed_config_is_refused_naming_each_changed_key(data, finished, tmp_path):
    work = tmp_path / "run"
    _copy_unfinished(finished, work)
    out = _run(_cmd(data, work, "--config.optim.learning_rate=1e-3", "--config.batch_size=16"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "optim.learning_rate: 0.003 -> 0.001" in out.stderr and "batch_size: 8 -> 16" in out.stderr
    assert "--allow_config_change" in out.stderr and not (work / "export").exists()
    # Cadence may change freely: a longer run with sparser logs resumes and ends at the new length.
    out = _run(_cmd(data, work, "--config.steps=210", "--config.log_every=5"))
    assert out.returncode == 0, out.stderr
    assert "resuming from step 200 of 210" in out.stderr
    assert json.loads((work / "summary.json").read_text())["steps"] == 210


def test_a_second_run_on_a_locked_workdir_is_refused_and_a_dead_runs_lock_taken_over(data, tmp_path):
    from sail_jax.workdir import WorkdirLock

    work = tmp_path / "run"
    lock = WorkdirLock(str(work))
    assert lock.acquire() is None
    out = _run(_cmd(data, work))
    lock.release()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"in use by a running job (host {os.uname().nodename}, pid {os.getpid()}" in out.stderr
    assert not (work / "metrics.jsonl").exists()
    (work / ".lock").write_text("host gone, pid 999999, since 2026-11-23 00:00:00")  # its process died
    out = _run(_cmd(data, work, "--config.steps=2"))
    assert out.returncode == 0, out.stderr
    assert "took over the lock" in out.stderr and "pid 999999" in out.stderr
    assert not (work / ".lock").exists()


def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous_one(data, finished, tmp_path):
    work = tmp_path / "run"
    _copy_unfinished(finished, work)
    for f in (work / "checkpoints" / "200" / "state").rglob("d/*"):
        f.write_bytes(f.read_bytes()[:10])  # truncated array data
    out = _run(_cmd(data, work))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"checkpoint step 200 at {work / 'checkpoints' / '200'} is unreadable (" in out.stderr
    assert "resuming from step 150 of 200" in out.stderr
    assert "Event loop is closed" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert _same_export(finished, work)
    # Nothing readable: one error naming the directory, exit 2, nothing deleted.
    shutil.rmtree(work / "export")
    (work / "summary.json").unlink()
    for step in ("100", "150", "200"):
        shutil.rmtree(work / "checkpoints" / step / "state")
    out = _run(_cmd(data, work))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"no readable checkpoint in {work / 'checkpoints'} (steps [200, 150, 100]" in out.stderr
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["100", "150", "200"]


def _interrupt(cmd, workdir, sig, at_rows: int) -> subprocess.Popen:
    """Start ``cmd``; send ``sig`` once metrics.jsonl has ``at_rows`` rows."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = workdir / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for _ in metrics.open()) >= at_rows:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    return proc


def test_sigterm_mid_run_saves_a_checkpoint_and_the_rerun_equals_the_uninterrupted_run(data, finished, tmp_path):
    work = tmp_path / "run"
    proc = _interrupt(_cmd(data, work), work, signal.SIGTERM, at_rows=int(np.random.randint(5, 40)))
    t0 = time.time()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert time.time() - t0 < 30 and "Traceback" not in stderr
    stopped = int(stderr.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert stopped < 200 and (work / "checkpoints" / str(stopped)).is_dir()
    assert not (work / "export").exists()
    out = _run(_cmd(data, work))
    assert out.returncode == 0 and f"resuming from step {stopped} of 200" in out.stderr, out.stderr[-2000:]
    assert _same_export(finished, work)
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").open() if '"train"' in line]
    assert steps == list(range(1, 201))


def test_sigterm_stops_the_sail_loop_at_its_block_end_and_the_rerun_equals_the_uninterrupted_run(data, tmp_path):
    """Through the CLI on a real SAIL run: samples are drawn every 3 steps, so a signal after step 1
    stops after step 3, where a checkpoint resumes exactly."""
    def sail(work):
        return [sys.executable, "-m", "sail_jax.cli", "--config=configs/sail_pp.py", f"--workdir={work}",
                f"--config.model.path={data['model']}", f"--config.data.train_path={data['train']}",
                f"--config.data.eval_path={data['eval']}", "--config.data.max_prompt_length=40",
                "--config.data.max_response_length=12", "--config.steps=6",
                "--config.batch_size=8", "--config.eval_batch_size=16", "--config.eval_every=6",
                "--config.log_every=1", "--config.checkpoint.every=0", "--config.generation.interval=3"]

    finished = tmp_path / "finished"
    assert _run(sail(finished)).returncode == 0
    work = tmp_path / "run"
    proc = _interrupt(sail(work), work, signal.SIGTERM, at_rows=3)  # eval and data rows, then step 1
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-2000:]
    assert "stopped by SIGTERM after step 3;" in stderr and (work / "checkpoints" / "3").is_dir()
    out = _run(sail(work))
    assert out.returncode == 0 and "resuming from step 3 of 6" in out.stderr, out.stderr[-2000:]
    assert _same_export(finished, work)


def test_sigkill_mid_run_then_rerun_gives_bitwise_identical_params(data, finished, tmp_path):
    work = tmp_path / "run"
    proc = _interrupt(_cmd(data, work), work, signal.SIGKILL, at_rows=int(np.random.randint(60, 180)))
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (work / "export").exists()
    out = _run(_cmd(data, work))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "took over the lock" in out.stderr  # the killed run could not release it
    assert _same_export(finished, work)


def test_an_over_long_or_empty_row_raises_naming_file_and_line_or_is_skipped_and_counted(data, tmp_path):
    rows = synthetic_pairs(32, 3)
    rows[2]["chosen"] = " red" * 40  # far over max_length=48 with its prompt
    text = "".join(json.dumps(r) + "\n" for r in rows[:2]) + "\n" + "".join(json.dumps(r) + "\n" for r in rows[2:])
    train = tmp_path / "train.jsonl"
    train.write_text(text)  # the blank line makes row 2 the file's line 4
    out = _run(_cmd(data, tmp_path / "a", train=train))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{train}:4: prompt + response = " in out.stderr and "data.on_error=skip" in out.stderr
    out = _run(_cmd(data, tmp_path / "b", "--config.data.on_error=skip", "--config.steps=2", train=train))
    assert out.returncode == 0, out.stderr[-2000:]
    first = json.loads((tmp_path / "b" / "metrics.jsonl").open().readline())
    assert first["split"] == "data" and first["skipped/train"] == 1 and first["skipped/eval"] == 0
    assert "skipped rows (data.on_error=skip): train 1, eval 0" in out.stdout
    rows[2]["chosen"] = ""
    write_jsonl(train, rows)
    out = _run(_cmd(data, tmp_path / "c", train=train))
    assert out.returncode == 2 and f"{train}:3: field 'chosen' must be a non-empty string" in out.stderr


@pytest.mark.parametrize("flag,message", [
    ("--config.optim.nmae=adamw", "--config.optim.nmae: the config has no key 'nmae'. Did you mean \"name\""),
    ("--config.optim.name=adamax", "config.optim.name='adamax' is unknown; valid:"),
    ("--config.data.eval_path=/no/such.jsonl", "config.data.eval_path='/no/such.jsonl': no such file"),
    ("--config.optim.learning_rate=abc", "--config.optim.learning_rate=abc: could not convert string to float"),
    ("--config.nosuch.key=1", "--config.nosuch.key: the config has no key 'nosuch'"),
    ("--config=configs/nope.py", "configs/nope.py [Errno 2] No such file or directory"),
    ("task", "task: only a SAIL config without model.path builds task files"),
    ("--config.lora.rank=-1", "config.lora.rank=-1 must be >= 0 (0: full training)"),
])
def test_user_errors_print_one_message_and_exit_2(data, tmp_path, flag, message):
    out = _run(_cmd(data, tmp_path / "run", flag))
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("error: ") and message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3, out.stderr


def test_the_sail_recipe_fails_on_a_bad_value_before_building_its_task(tmp_path):
    t0 = time.time()
    out = _run([sys.executable, "-m", "sail_jax.cli", "--config=configs/sail_pp.py", f"--workdir={tmp_path}",
                "--config.optim.name=adamax"])
    assert out.returncode == 2 and "config.optim.name='adamax' is unknown" in out.stderr
    assert time.time() - t0 < 30 and not (tmp_path / "task").exists()
    out = _run([sys.executable, "-m", "sail_jax.cli", "--config=configs/sail_pp.py", f"--workdir={tmp_path}",
                "--debug", "--config.optim.name=adamax"])
    assert out.returncode != 0 and "Traceback" in out.stderr  # --debug shows where


def test_a_stop_waits_for_a_step_where_the_trainer_can_resume_exactly(tiny_checkpoint, tmp_path):
    """The SAIL loop checkpoints only between generation blocks: a signal mid-block stops at the block's end."""
    from sail_jax.configs import base_config
    from sail_jax.data.pipeline import encode_preference, train_iterator
    from sail_jax.data.records import Records
    from sail_jax.driver import drive
    from sail_jax.errors import Stopped
    from sail_jax.models import load_pretrained
    from sail_jax.objectives import sft_objective
    from sail_jax.optim import make_optimizer
    from sail_jax.recipes.offline import OfflineTrainer
    from sail_jax.sharding import make_mesh
    from sail_jax.tokenization import Tokenizer
    from sail_jax.train import make_train_step
    from sail_jax.trainable import prepare

    config = base_config("sft")
    config.update(steps=12, log_every=1, eval_every=100)
    config.checkpoint.update(every=0, async_save=False)
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    tx = make_optimizer(config.optim, config.steps)
    trainable, state, shardings = prepare(load_pretrained(tiny_checkpoint), tx, mesh, config.lora, seed=0)
    step = make_train_step(trainable.graphdef, tx, sft_objective, mesh, shardings, {}, seed=0)
    arrays = encode_preference(Records(synthetic_pairs(16)), Tokenizer.from_pretrained(tiny_checkpoint),
                               max_prompt_length=40, max_length=48).arrays
    sft = {"input_ids": arrays["chosen_input_ids"], "attention_mask": arrays["chosen_attention_mask"],
           "loss_mask": arrays["chosen_loss_mask"], "valid": arrays["valid"]}

    class BlockTrainer(OfflineTrainer):
        def can_checkpoint(self, done):
            return done % 4 == 0

    def train_step(s, b):
        if int(s.step) == 4:  # a real SIGTERM to this process during step 5, inside the block 5..8
            os.kill(os.getpid(), signal.SIGTERM)
        return step(s, b, {})

    trainer = BlockTrainer(state, shardings, train_iterator(sft, 8, seed=0), mesh, train_step, lambda: {},
                           trainable)
    with pytest.raises(Stopped) as stopped:
        drive(trainer, config, str(tmp_path), desc="sft")
    assert stopped.value.step == 8 and stopped.value.exit_code == 128 + signal.SIGTERM
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["8"]


def test_a_run_saved_before_an_option_existed_resumes_while_the_option_is_off():
    from sail_jax.workdir import changed_keys

    saved = {"optim.learning_rate": 0.001, "lora.rank": 0}
    off = {"lora.quantize": "", "reward.fn": "", "sail.xpo_alpha": 0.0, "sail.opponent": "policy",
           "reference.precompute": False, "log_completions": 8, "pg.method": "", "pg.loss_type": "dapo",
           "pg.scale_rewards": "group", "pg.epsilon": 0.2, "pg.epsilon_high": None, "pg.beta": 0.0}
    assert changed_keys(saved, {**saved, **off}) == []
    assert changed_keys(saved, {**saved, **off, "pg.method": "grpo"}) == ["pg.method: '<unset>' -> 'grpo'"]
    assert changed_keys(saved, {**saved, "lora.quantize": "nf4"}) == ["lora.quantize: '<unset>' -> 'nf4'"]
    assert changed_keys(saved, {**saved, "sail.opponent": "data", "sail.xpo_alpha": 1e-5}) == [
        "sail.opponent: '<unset>' -> 'data'", "sail.xpo_alpha: '<unset>' -> 1e-05"]
    assert changed_keys({**saved, "reward.fn": "m:f"}, {**saved, "reward.fn": ""}) == ["reward.fn: 'm:f' -> ''"]


def test_sweeps_share_compiled_programs_through_the_persistent_cache(tmp_path):
    """``use_compile_cache`` (called by every sweep) puts JAX's persistent compilation cache in
    OUT/jax_cache for the process and its workers: a second process finds the program there."""
    code = ("import sys, jax, jax.numpy as jnp; from sail_jax.sweep import use_compile_cache; "
            "print(use_compile_cache(sys.argv[1])); "
            "f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T); f(jnp.ones((64, 64))).block_until_ready()")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cache = tmp_path / "jax_cache"
    assert out.stdout.strip() == str(cache) and any(cache.iterdir())


def test_a_stopped_sweep_leaves_whole_seeds_and_its_finished_runs_can_be_read(tmp_path, monkeypatch):
    """Sweeps run seed by seed (every variant of seed 0 before any of seed 1; with phases, phase by
    phase), so one stopped early leaves whole paired seeds; ``finished_runs`` reads what finished
    without running anything."""
    from sail_jax import sweep as sweep_module

    order = []

    def fake_run_one(make_config, variant, seed, out, **overrides):
        order.append((variant, seed))
        return {"variant": variant, "final": {"reward": seed}}

    monkeypatch.setattr(sweep_module, "run_one", fake_run_one)
    monkeypatch.setattr(sweep_module, "use_compile_cache", lambda out: out)  # leave this process's jax config alone
    results = sweep_module.sweep(None, ["a", "b"], 2, str(tmp_path))
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert [r["final"]["reward"] for r in results["b"]] == [0, 1]
    order.clear()  # phases: every seed of the first phase's variants before the next phase
    sweep_module.sweep(None, ["a", "b", "c"], 2, str(tmp_path), phases=[["b"], ["a", "c"]])
    assert order == [("b", 0), ("b", 1), ("a", 0), ("c", 0), ("a", 1), ("c", 1)]
    with pytest.raises(ValueError, match="must hold each of the variants"):
        sweep_module.sweep(None, ["a", "b"], 1, str(tmp_path), phases=[["a"]])
    for variant, seed in (("a", 0), ("b", 0), ("a", 2)):
        os.makedirs(tmp_path / variant / f"seed{seed}")
        (tmp_path / variant / f"seed{seed}" / "summary.json").write_text(json.dumps({"final": {"reward": seed}}))
    (tmp_path / "b" / "seed1").mkdir()  # started, not finished: no summary
    done = sweep_module.finished_runs(["a", "b", "c"], 3, str(tmp_path))
    assert [r["seed"] for r in done["a"]] == [0, 2] and [r["seed"] for r in done["b"]] == [0] and done["c"] == []
    # stop_after: no run starts past the deadline (here each run takes one tick of a fake clock), and
    # the result is what finished, seed-tagged as finished_runs reads it.
    clock = {"now": 0.0}
    monkeypatch.setattr(sweep_module, "time", type("Clock", (), {"time": staticmethod(lambda: clock["now"])}))

    def ticking_run_one(make_config, variant, seed, out, **overrides):
        clock["now"] += 1.0
        path = os.path.join(out, variant, f"seed{seed}")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "summary.json"), "w") as f:
            json.dump({"final": {"reward": seed}}, f)
        order.append((variant, seed))

    monkeypatch.setattr(sweep_module, "run_one", ticking_run_one)
    order.clear()
    stopped = sweep_module.sweep(None, ["x", "y"], 3, str(tmp_path), stop_after=2.5)
    assert order == [("x", 0), ("y", 0), ("x", 1)]
    assert [r["seed"] for r in stopped["x"]] == [0, 1] and [r["seed"] for r in stopped["y"]] == [0]


def test_a_ledger_carries_finished_runs_to_the_next_session_and_leaves_stale_ones_to_rerun(tmp_path, monkeypatch):
    """A sweep too long for one session goes on in the next through a ledger of finished runs: each run
    records its config's fingerprint and where it ran; ``load_ledger`` restores only the runs whose
    config is what the sweep asks for today (another lr is stale, another machine's paths are not), and
    ``run_one`` then reads a restored run instead of running it; saving keeps the ledger's other runs."""
    from sail_jax import sweep as sweep_module
    from sail_jax.configs import sail_config
    from sail_jax.recipes import sail as sail_recipe

    calls = []

    def fake_run(config, workdir):  # the recipe's side of a run: its workdir and its summary
        os.makedirs(workdir)
        calls.append((config.variant, config.seed))
        return {"variant": config.variant, "final": {"reward": 0.1 * config.seed}}

    monkeypatch.setattr(sail_recipe, "run", fake_run)

    def make(variant, lr=3e-4):
        c = sail_config(variant)
        c.optim.learning_rate = lr
        return c

    first, second, ledger = tmp_path / "first", tmp_path / "second", str(tmp_path / "ledger.json")
    for variant, seed in (("online_dpo", 0), ("sail_pr", 0), ("online_dpo", 1)):
        summary = sweep_module.run_one(make, variant, seed, str(first))
        assert summary["config_fingerprint"] and summary["commit"] and summary["device"] and summary["jax"]
    assert sweep_module.save_ledger(["online_dpo", "sail_pr"], 2, str(first), ledger) == 3
    with monkeypatch.context() as m:  # a copy of the tree without git (a rented GPU's): the commit from the env
        m.setattr(sweep_module.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("git")))
        m.setenv("SAIL_JAX_COMMIT", "abc1234")
        assert sweep_module.run_one(make, "sail_pr", 1, str(tmp_path / "nogit"))["commit"] == "abc1234"

    local = make("online_dpo")
    local.task.dir = "/elsewhere/task"
    assert sweep_module.config_fingerprint(local) == sweep_module.config_fingerprint(make("online_dpo"))
    here, there = make("online_dpo"), make("online_dpo")  # the same model in another machine's folder
    here.model.path, there.model.path = "/here/model", "/elsewhere/model"
    assert sweep_module.config_fingerprint(here) == sweep_module.config_fingerprint(there)
    assert sweep_module.config_fingerprint(make("online_dpo", lr=1e-4)) != sweep_module.config_fingerprint(local)
    # A setting added after a ledger was written leaves its runs' fingerprints alone at its old behaviour.
    before = make("online_dpo")
    del before.data["train_kind"]
    assert sweep_module.config_fingerprint(before) == sweep_module.config_fingerprint(local)
    prompts = make("online_dpo")
    prompts.data.train_kind = "prompt"
    assert sweep_module.config_fingerprint(prompts) != sweep_module.config_fingerprint(local)
    coarse = make("online_dpo")  # length buckets cut padding: the same run, whichever they are
    coarse.data.buckets, coarse.data.bucket_min = "pow2", 32
    assert sweep_module.config_fingerprint(coarse) == sweep_module.config_fingerprint(local)

    def make_new_lr(variant):  # today's sweep changed sail_pr's learning rate: its run is stale
        return make(variant, lr=1e-4 if variant == "sail_pr" else 3e-4)

    taken, stale = sweep_module.load_ledger(ledger, make_new_lr, str(second))
    assert (taken, stale) == (2, ["sail_pr/seed0"])
    calls.clear()
    assert sweep_module.run_one(make_new_lr, "online_dpo", 1, str(second))["final"]["reward"] == 0.1
    assert calls == []  # restored, not rerun
    sweep_module.run_one(make_new_lr, "sail_pr", 0, str(second))
    assert calls == [("sail_pr", 0)]
    assert sweep_module.load_ledger(str(tmp_path / "none.json"), make, str(second)) == (0, [])
    # The new sail_pr run sits beside the old one (another setting), and the others are kept.
    assert sweep_module.save_ledger(["sail_pr"], 1, str(second), ledger) == 4
    with open(ledger) as f:
        keys = sorted(json.load(f))
    new_lr = sweep_module.config_fingerprint(make_new_lr("sail_pr"))
    assert f"sail_pr/seed0/{new_lr}" in keys and len([k for k in keys if k.startswith("sail_pr/seed0/")]) == 2
    assert sweep_module.load_ledger(ledger, make_new_lr, str(tmp_path / "third")) == (3, [])
    only_pr = lambda v: make_new_lr({"online_dpo": "no_such_variant"}.get(v, v))  # noqa: E731 (an arm dropped)
    assert sweep_module.load_ledger(ledger, only_pr, str(tmp_path / "fourth")) == (1, ["online_dpo/seed0",
                                                                                      "online_dpo/seed1"])


def test_wandb_logging_writes_a_run_that_a_resumed_run_continues(data, tmp_path):
    """logging.wandb (offline mode: no network) logs the run's metrics to a W&B run kept in the workdir;
    rerunning the same workdir continues that W&B run (same id), and the flag never changes the run's
    identity (it is free to flip on resume)."""
    workdir = tmp_path / "run"
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    short = ("--config.steps=20", "--config.checkpoint.every=10", "--config.log_every=5", "--config.eval_every=20")
    base = dpo_command(workdir, data["model"], data["train"], data["eval"], *short)
    first = subprocess.run([*base, "--config.steps=10"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    out = subprocess.run([*base, "--config.logging.wandb=True", "--config.logging.wandb_project=tests"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    run_id = (workdir / "wandb_run_id").read_text().strip()
    runs = sorted((workdir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((workdir / "wandb").iterdir())
    again = subprocess.run([*base, "--config.steps=30", "--config.logging.wandb=True"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (workdir / "wandb_run_id").read_text().strip() == run_id
    assert len(sorted((workdir / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1


def test_the_shipped_ledger_still_takes_every_run_it_holds(tmp_path):
    """docs/smollm2_ifeval_reduced_runs.json carries finished GPU/CPU runs from session to session: a change
    to configs or defaults that does not change what those runs did must not orphan them (a change that
    does is a decision, made by editing this test)."""
    import functools
    import importlib.util

    from sail_jax.sweep import load_ledger

    spec = importlib.util.spec_from_file_location("study_arms", os.path.join(REPO, "experiments", "study_arms.py"))
    arms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arms)
    make = functools.partial(arms.make_config, steps=12, out=str(tmp_path), task="ifeval", gguf="", reduced=True)
    taken, stale = load_ledger(os.path.join(REPO, "docs", "smollm2_ifeval_reduced_runs.json"), make, str(tmp_path))
    assert (taken, stale) == (25, [])
