"""Reward plug-ins: ``reward.kind=python`` calls the user's function on text, checks what it returns,
names the bad row; ``reward.sources`` sums weighted sources; both label a SAIL-PR run end to end
through the CLI."""

import json
import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from sail_jax.configs import sail_config
from sail_jax.errors import UserError
from sail_jax.rewards import RewardError, make_reward_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLUGIN = textwrap.dedent('''
    def words(prompts, responses):
        """One point per word: longer answers win."""
        return [float(len(r.split())) for r in responses]

    def has_the(prompts, responses):
        return [float("the" in r.split()) for r in responses]

    def one_short(prompts, responses):
        return [1.0] * (len(responses) - 1)

    def nan_on_empty(prompts, responses):
        return [float("nan") if not r.strip() else 1.0 for r in responses]

    def strings(prompts, responses):
        return ["good"] * len(responses)

    not_a_function = 3
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def shared_task(tmp_path_factory):
    """A folder for the built-in task's files, which the first run in it builds."""
    return tmp_path_factory.mktemp("task") / "task"


def _source(fn):
    return make_reward_source(ml_collections.ConfigDict({"kind": "python", "fn": fn}))


def test_python_reward_scores_text_with_the_users_function(plugin):
    scores = _source("my_rewards:words")(["Q: a?", "Q: b?"], ["one two three", ""])
    assert scores.dtype == np.float32 and scores.tolist() == [3.0, 0.0]


@pytest.mark.parametrize("fn,message", [
    ("my_rewards:one_short", "returned shape (1,) for 2 responses; it must return one float per response"),
    ("my_rewards:nan_on_empty", "returned nan for response 1 (' '); scores must be finite"),
    ("my_rewards:strings", "returned something that is not a list of numbers"),
])
def test_python_reward_that_returns_the_wrong_thing_names_it(plugin, fn, message):
    with pytest.raises(RewardError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _source(fn)(["p", "p"], ["fine", " "])


@pytest.mark.parametrize("fn,message", [
    ("my_rewards", "must name a function as 'package.module:function'"),
    ("no_such_module:f", "cannot import 'no_such_module'"),
    ("my_rewards:missing", "module 'my_rewards' has no 'missing'"),
    ("my_rewards:not_a_function", "is not callable"),
])
def test_python_reward_that_cannot_load_fails_in_validation(plugin, fn, message):
    from sail_jax.validation import validate_online_config

    config = sail_config("sail_pr")
    config.reward.update(kind="python", fn=fn)
    with pytest.raises(RewardError, match=message):
        validate_online_config(config)


def test_weighted_sources_sum_their_scores(plugin):
    from sail_jax.tasks import get_task

    prompts, responses = ["Topic: sea. Describe it:"] * 3, [" the sea is calm.", " a b", " the"]
    source = make_reward_source(ml_collections.ConfigDict(
        {"kind": "", "sources": "2*python:my_rewards:words + -0.5*python:my_rewards:has_the + builtin"}))
    oracle = np.asarray([get_task("builtin").oracle_reward(p, r) for p, r in zip(prompts, responses)])
    expected = 2 * np.array([4.0, 2.0, 1.0]) - 0.5 * np.array([1.0, 0.0, 1.0]) + oracle
    np.testing.assert_allclose(source(prompts, responses), expected, rtol=1e-6)


@pytest.mark.parametrize("sources,message", [
    ("0.5*builtin + x*python:my_rewards:words", r"term 2 \('x\*python:my_rewards:words'\): weight 'x' is not a number"),
    ("0.5*oracle", r"term 1 \('0.5\*oracle'\): kind 'oracle' is unknown"),
    ("1*python", "python needs its function"),
    ("1*model", "model needs its folder"),
    ("0*builtin", "must be finite and nonzero"),
    ("builtin:x", "the builtin oracle takes no argument"),
    ("builtin + python:my_rewards:missing", "reward.sources term 2.*module 'my_rewards' has no 'missing'"),
    ("builtin + model:/no/such/folder", "config.reward.sources term 2='/no/such/folder': no such folder"),
])
def test_bad_reward_sources_fail_in_validation_naming_the_term(plugin, sources, message):
    from sail_jax.validation import validate_online_config

    config = sail_config("sail_pr")
    config.reward.sources = sources
    with pytest.raises(UserError, match=message):
        validate_online_config(config)
    config.reward.update(sources="builtin", kind="builtin")
    with pytest.raises(UserError, match="leave reward.kind empty"):
        validate_online_config(config)


def test_a_failing_source_is_named_by_its_term(plugin):
    source = make_reward_source(ml_collections.ConfigDict({"kind": "", "sources": "builtin + python:my_rewards:one_short"}))
    with pytest.raises(RewardError, match="reward.sources term 2 my_rewards:one_short returned shape"):
        source(["p", "p"], ["a", "b"])


@pytest.mark.slow
@pytest.mark.parametrize("reward", [["--config.reward.kind=python", "--config.reward.fn=my_rewards:words"],
                                    ["--config.reward.sources=1.0*python:my_rewards:words + 0.5*builtin",
                                     "--config.reward.eval_kind=python", "--config.reward.eval_fn=my_rewards:words"]],
                         ids=["python", "weighted_sources"])
def test_a_python_reward_labels_sail_pr_end_to_end(plugin, shared_task, tmp_path, reward):
    """The built-in task with its PR route labelled by the plug-in (longer answers win) or by a weighted
    pair of sources (the plug-in plus half the task's oracle), and evaluated by the plug-in: the
    policy's answers grow. (The task's files, which no reward touches, are built once for both.)"""
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": os.pathsep.join([str(plugin), REPO])}
    out = subprocess.run([sys.executable, "-m", "sail_jax.cli", "--config=configs/sail_pr.py",
                          f"--workdir={tmp_path / 'run'}", *reward, "--config.sail.p_pr=1.0", "--config.steps=30",
                          "--config.eval_every=30", "--config.task.sft_steps=100",
                          "--config.task.preference_train=256", "--config.task.preference_eval=32",
                          f"--config.task.dir={shared_task}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final"]["reward"] > summary["reference"]["reward"] + 0.5, summary
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any("pr/sample_reward" in r for r in logged if r["split"] == "train")


@pytest.mark.parametrize("variant,needs_reward", [("sail_pr", True), ("online_dpo", True), ("xpo", True),
                                                  ("nash_md", True), ("sail_pp", False), ("spin", False),
                                                  ("sail_dp", False), ("offline_dpo", False)])
def test_own_model_with_no_reward_named_fails_before_any_work_where_a_route_scores_samples(
        tiny_checkpoint, tmp_path, variant, needs_reward):
    """A task's oracle scores only its task: on the user's model and data, a route that labels samples
    with a reward and no reward named stops at validation; routes that read no reward run."""
    from conftest import synthetic_pairs, write_jsonl

    from sail_jax.validation import validate_online_config

    config = sail_config(variant)
    config.model.path = tiny_checkpoint
    config.data.train_path = config.data.eval_path = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(4))
    if needs_reward:
        with pytest.raises(UserError, match=r"config.reward.kind is empty, but sail.p_pr=[0-9.]+ labels sampled pairs "
                                             r"with a reward: set reward.kind to one of \['builtin', "):
            validate_online_config(config)
        config.reward.kind = "builtin"  # named, even the task's own oracle, it is the user's choice
    validate_online_config(config)
    builtin_task = sail_config(variant)  # no model.path: the task builds the model, its oracle scores
    validate_online_config(builtin_task)


def test_evaluation_with_no_reward_reports_kl_and_health_and_says_what_it_left_out(tiny_checkpoint):
    import ml_collections as mlc
    from conftest import synthetic_pairs
    from flax import nnx

    from sail_jax.data.pipeline import encode_online
    from sail_jax.data.records import Records
    from sail_jax.evaluate import Evaluator
    from sail_jax.models import load_pretrained
    from sail_jax.recipes.sail import summary_text
    from sail_jax.tokenization import Tokenizer

    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    rows = synthetic_pairs(4, seed=3)
    arrays = encode_online(Records(rows), tokenizer, max_prompt_length=64, max_response_length=8).arrays
    graphdef, params = nnx.split(load_pretrained(tiny_checkpoint))
    ev = Evaluator(graphdef, (graphdef, params), prompts=[r["prompt"] for r in rows], eval_arrays=arrays,
                   reward_source=None, tokenizer=tokenizer, gen_cfg=mlc.ConfigDict({"max_new_tokens": 8}),
                   beta=0.1, batch_size=4, seed=0)
    metrics = ev(params)
    assert not {"reward", "score", "win_rate", "reference_reward"} & set(metrics)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-5) and 0 < metrics["distinct_2"] <= 1
    assert "heldout/rewards/accuracies" in metrics
    summary = {"variant": "sail_pp", "reference": metrics, "final": metrics}
    text = summary_text(summary, ev.sample_table(), oracle=False)
    assert "no reward configured" in text and "(+" not in text
    assert text.splitlines()[1].split()[3:5] == ["-", "-"]  # the reward and win-rate columns


def test_a_python_callable_labels_a_run_on_your_own_model_and_data_from_sail_jax_run(tiny_checkpoint, tmp_path):
    """``sail_jax.run(config, workdir, reward=fn)``, as a notebook calls it: the function labels the PR
    route and scores the evaluation; the run's saved config names it; the same call on the finished
    run returns its summary; a reward named twice, or given to a recipe that reads none, is refused."""
    import sail_jax
    from conftest import synthetic_pairs, write_jsonl

    from sail_jax.configs import base_config

    def config():
        c = sail_config("online_dpo")
        c.model.path = tiny_checkpoint
        c.data.train_path = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(32, 1))
        c.data.eval_path = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(8, 2))
        c.data.max_prompt_length, c.data.max_response_length = 40, 12
        c.update(steps=4, batch_size=8, eval_batch_size=8, eval_every=4, log_every=1, compilation_cache="off")
        c.checkpoint.every = 0
        return c

    def words(prompts, responses):
        return [float(len(r.split())) for r in responses]

    given = config()
    summary = sail_jax.run(given, str(tmp_path / "run"), reward=words)
    assert given.reward.kind == "" and given.reward.fn == ""  # the caller's config is left as it was
    assert summary["final"]["reward"] >= 0 and "win_rate" in summary["final"]
    [identity] = (tmp_path / "run").rglob("run_config.json")
    saved = json.loads(identity.read_text())
    assert saved["reward.kind"] == "python" and saved["reward.fn"].endswith(".words")
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any("pr/sample_reward" in r for r in logged if r["split"] == "train")
    assert sail_jax.run(given, str(tmp_path / "run"), reward=words) == (tmp_path / "run" / "summary.txt").read_text()
    named = config()
    named.reward.kind = "builtin"
    with pytest.raises(UserError, match=r"reward=... and config.reward \(kind='builtin', sources=''\) both name"):
        sail_jax.run(named, str(tmp_path / "named"), reward=words)
    with pytest.raises(UserError, match="config.recipe='dpo' reads no reward"):
        sail_jax.run(base_config("dpo"), str(tmp_path / "dpo"), reward=words)
