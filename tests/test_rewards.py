"""Reward plug-ins: ``reward.kind=python`` calls the user's function on text, checks what it returns,
names the bad row, and labels a SAIL-PR run end to end through the CLI."""

import json
import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from sail_jax.configs import sail_config
from sail_jax.rewards import RewardError, make_reward_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLUGIN = textwrap.dedent('''
    def words(prompts, responses):
        """One point per word: longer answers win."""
        return [float(len(r.split())) for r in responses]

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


@pytest.mark.slow
def test_a_python_reward_labels_sail_pr_end_to_end(plugin, tmp_path):
    """The built-in task with its PR route labelled by the plug-in (longer answers win) and evaluated by
    it too: the policy's answers grow."""
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": os.pathsep.join([str(plugin), REPO])}
    out = subprocess.run([sys.executable, "-m", "sail_jax.cli", "--config=configs/sail_pr.py",
                          f"--workdir={tmp_path / 'run'}", "--config.reward.kind=python",
                          "--config.reward.fn=my_rewards:words", "--config.sail.p_pr=1.0", "--config.steps=30",
                          "--config.eval_every=30", "--config.task.sft_steps=100",
                          "--config.task.preference_train=256", "--config.task.preference_eval=32"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final"]["reward"] > summary["reference"]["reward"] + 0.5, summary
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any("pr/sample_reward" in r for r in logged if r["split"] == "train")
