"""Built-in tasks: one interface, oracles that score what their docstrings say, and the headroom the
praise task promises (SFT low, the optimum reachable within the response budget)."""

import numpy as np
import pytest

from sail_jax.configs import sail_config
from sail_jax.tasks import TASK_NAMES, builtin, get_task, praise


def test_every_task_has_the_interface_and_unknown_names_list_the_valid_ones():
    for name in TASK_NAMES:
        task = get_task(name)
        for attr in ("prompts", "oracle_reward", "build_policy", "MODEL_DIR"):
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
    budget = sail_config("sail_pp").data.max_response_length
    assert len(tokenizer.encode_response(prompt, best)) <= budget
