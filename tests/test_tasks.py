"""Built-in tasks: one interface, oracles that score what their docstrings say, and the headroom the
praise task promises (SFT low, the optimum reachable within the response budget)."""

import numpy as np
import pytest

from sail_jax.tasks import TASK_NAMES, builtin, get_task, praise


def test_every_task_has_the_interface_and_unknown_names_list_the_valid_ones():
    for name in TASK_NAMES:
        task = get_task(name)
        for attr in ("prompts", "oracle_reward", "build_policy", "MODEL_DIR", "DEFAULTS"):
            assert hasattr(task, attr), (name, attr)
    with pytest.raises(ValueError, match=r"valid: \['builtin', 'praise', 'ifeval'\]"):
        get_task("count")


def test_builtin_oracle_scores_topic_sentiment_and_gibberish():
    p = builtin.make_prompt("apple")
    assert builtin.oracle_reward(p, " apple is great and lovely.") == pytest.approx(1.0)
    assert builtin.oracle_reward(p, " it is awful.") == pytest.approx(-0.7)
    assert builtin.oracle_reward(p, " apple xyz.") == pytest.approx(0.3 - 0.25)
    assert builtin.oracle_reward(p, "") == -1.0
    demos = builtin.sft_records(2000, 0)
    mean = np.mean([builtin.oracle_reward(r["prompt"], r["response"]) for r in demos])
    assert 0.0 < mean < 0.4  # the SFT data leaves room to improve (the optimum is 1.0)


def test_praise_oracle_counts_distinct_positive_words_and_charges_negatives():
    p = praise.make_prompt("river")
    assert praise.oracle_reward(p, " river is great and lovely.") == pytest.approx(0.25)
    assert praise.oracle_reward(p, " great great great.") == pytest.approx(0.125)  # distinct words only
    assert praise.oracle_reward(p, " great and awful.") == pytest.approx(0.125 - 0.25)
    assert praise.oracle_reward(p, " great xyz.") == pytest.approx(0.125 - 0.25)
    assert praise.oracle_reward(p, "") == -1.0
    assert praise.oracle_reward(p, " " + " ".join(praise.POSITIVE) + ".") == 1.0  # capped at eight words


def test_praise_has_headroom_sft_low_and_the_optimum_fits_the_response_budget():
    from sail_jax.tokenization import train_bpe_tokenizer

    demos = praise.sft_records(4000, 0)
    assert np.mean([praise.oracle_reward(r["prompt"], r["response"]) for r in demos]) <= 0.2
    prompt = praise.prompts(1, 0)[0]
    best = praise.optimal_response(prompt)
    assert praise.oracle_reward(prompt, best) >= 0.9
    tokenizer = train_bpe_tokenizer(praise.tokenizer_corpus(), vocab_size=600)
    budget = praise.DEFAULTS["data.max_response_length"]
    assert len(tokenizer.encode_response(prompt, best)) <= budget


def test_lengths_and_learning_rate_come_from_the_task_or_default_to_real_data():
    """A shipped SAIL config leaves caps and learning rate to what is trained: the task's own values when
    the task builds the model, real-data values on the user's model; what the user sets stays."""
    from sail_jax.configs import REAL_DATA_DEFAULTS, fill_defaults, sail_config

    task = sail_config("sail_pr")
    fill_defaults(task)
    assert (task.data.max_prompt_length, task.data.max_response_length, task.generation.max_new_tokens,
            task.optim.learning_rate) == (12, 12, 12, 3e-4)
    mine = sail_config("sail_pr")
    mine.model.path, mine.data.max_response_length = "my_model", 128
    fill_defaults(mine)
    assert (mine.data.max_prompt_length, mine.data.max_response_length, mine.generation.max_new_tokens,
            mine.optim.learning_rate) == (REAL_DATA_DEFAULTS["data.max_prompt_length"], 128, 128, 1e-6)


def test_a_task_built_before_any_run_validates_its_config_takes_the_tasks_lengths(tmp_path, monkeypatch):
    """A sweep builds its shared task from an arm's config before any run has filled its unset keys:
    ``prepare_task`` fills them itself (the task's caps, not None), as a run's validation would."""
    from sail_jax.configs import sail_config
    from sail_jax.tasks import prepare as prepare_module

    seen = {}

    class Built(Exception):
        pass

    def build_policy(config, root):
        seen.update(prompt=config.data.max_prompt_length, response=config.data.max_response_length)
        raise Built

    monkeypatch.setattr(prepare_module, "get_task", lambda name: type("Task", (), {
        "MODEL_DIR": "sft/export", "build_policy": staticmethod(build_policy)}))
    config = sail_config("grpo")
    assert config.data.max_prompt_length is None
    with pytest.raises(Built):
        prepare_module.prepare_task(config, str(tmp_path))
    assert seen == {"prompt": builtin.DEFAULTS["data.max_prompt_length"],
                    "response": builtin.DEFAULTS["data.max_response_length"]}
