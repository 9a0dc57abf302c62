"""The IFEval-style task: constraints parse back out of prompts and check what they say."""

import os

import numpy as np
import pytest

from ml_collections import ConfigDict

from sail_jax.tasks import ifeval as T
from sail_jax.rewards import make_reward_source


def _prompt(*instructions):
    return [{"role": "user", "content": "Describe baking bread. " + " ".join(instructions)}]


@pytest.mark.parametrize("name,arg,good,bad", [
    ("lowercase", None, "bread is warm and soft.", "Bread is warm."),
    ("no_commas", None, "warm bread smells good", "warm, soft bread"),
    ("include_word", "fresh", "Fresh bread is the best.", "refreshing bread"),
    ("start_word", "Today", "Today, I bake bread.", "I bake bread today."),
    ("end_phrase", "Have a nice day.", "Bake it well. Have a nice day.", "Have a nice day. Bake it well."),
    ("max_words", "5", "Bake it well.", "Bake it in a hot oven for an hour."),
    ("bullets", "2", "Steps:\n- mix flour\n- bake it", "- mix\n- knead\n- bake"),
])
def test_each_constraint_parses_and_checks(name, arg, good, bad):
    c = T.CONSTRAINTS[name]
    prompt = _prompt(c.instruction(arg))
    [(found, found_arg)] = T.constraints_of(prompt)
    assert found.name == name and found_arg == (None if arg is None else str(arg))
    assert T.oracle_reward(prompt, good) == 1.0
    assert T.oracle_reward(prompt, bad) == 0.0


def test_reward_is_the_fraction_of_constraints_satisfied():
    prompt = _prompt(T.CONSTRAINTS["lowercase"].instruction(None), T.CONSTRAINTS["no_commas"].instruction(None))
    assert T.satisfied(prompt, "soft, warm bread") == [True, False]
    assert T.oracle_reward(prompt, "soft, warm bread") == 0.5
    assert T.oracle_reward("a prompt with no constraints", "anything") == 0.0
    source = make_reward_source(ConfigDict({"kind": "ifeval", "path": ""}))
    np.testing.assert_allclose(source([prompt, prompt], ["soft warm bread", "Soft, warm"]), [1.0, 0.0])


def test_prompts_are_deterministic_consistent_and_split_disjointly():
    train, held = T.prompts(300, seed=1, split="train"), T.prompts(300, seed=1, split="eval")
    assert train == T.prompts(300, seed=1, split="train")
    for prompts in (train, held):
        for p in prompts:
            found = T.constraints_of(p)
            assert 1 <= len(found) <= 2
            names = [c.name for c, _ in found]
            assert not any(a in T.CONSTRAINTS[b].conflicts for a in names for b in names)
    text = lambda ps: {p[0]["content"].split(". ")[0] for p in ps}  # noqa: E731 (request + topic)
    assert not text(train) & text(held)
    words = lambda ps: {a for p in ps for c, a in T.constraints_of(p) if c.name == "include_word"}  # noqa: E731
    assert words(train) and words(held) and not words(train) & words(held)
    with pytest.raises(ValueError, match="split='test'"):
        T.prompts(1, seed=0, split="test")


def test_offline_pairs_are_best_vs_worst_finished_samples_without_ties(monkeypatch):
    from sail_jax.configs import ifeval_config
    from sail_jax.tasks import prepare

    class Tok:  # encode_response only measures length here
        def encode_response(self, prompt, text):
            return text.split()

    texts = ["Fresh bread is good", "bread", "fresh", "stale",   # prompt 0: 1.0, 0.0, 1.0(unfinished), 0.0
             "bread", "crumbs", "toast", "loaf"]                 # prompt 1: all 0.0: a tie, dropped
    finished = np.array([1, 1, 0, 1, 1, 1, 1, 1], bool)
    monkeypatch.setattr(prepare, "sample_texts", lambda *a: (texts, finished))
    prompt = [{"role": "user", "content": 'Describe bread. Include the word "fresh" in your answer.'}]
    monkeypatch.setattr(T, "prompts", lambda *a, **k: [prompt, prompt])
    rows = prepare.oracle_labelled_pairs(None, Tok(), ifeval_config("offline_dpo"), "train", 2, seed=1)
    assert rows == [{"prompt": prompt, "chosen": "Fresh bread is good", "rejected": "bread"}]


@pytest.mark.slow
def test_sail_recipe_runs_the_ifeval_task_on_a_gguf_model(tmp_path):
    """GGUF import -> online SAIL-PR on IFEval prompts -> prompt-only evaluation -> HF export."""
    import json

    import torch
    from test_gguf import _tiny, write_gguf
    from transformers import AutoModelForCausalLM

    from sail_jax.configs import ifeval_config
    from sail_jax.recipes.sail import run
    from sail_jax.tokenization import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([p[0]["content"] for p in T.prompts(200, 0)], vocab_size=400)
    gguf = write_gguf(str(tmp_path / "tiny.gguf"), _tiny("LlamaForCausalLM", tokenizer), tokenizer)
    config = ifeval_config("sail_pr", reduced=True)
    config.task.update(gguf=gguf, dir=str(tmp_path / "task"), preference_eval=8)
    config.update(steps=2, eval_every=2, batch_size=8, eval_batch_size=8)
    config.data.max_response_length = config.generation.max_new_tokens = 16
    config.data.max_prompt_length = 160  # this tiny tokenizer splits prompts finer than SmolLM2's (<= 74 tokens)
    # A random model rarely finishes, so the offline pairs are written by hand (prepare_task keeps them).
    os.makedirs(config.task.dir)
    with open(os.path.join(config.task.dir, "preferences_train.jsonl"), "w") as f:
        for p in T.prompts(8, 1):
            f.write(json.dumps({"prompt": p, "chosen": "fresh bread", "rejected": "Stale, bread"}) + "\n")
    summary = run(config, str(tmp_path / "run"))
    assert set(summary["final"]) >= {"score", "finished", "reward", "win_rate", "kl"}
    assert len(open(os.path.join(config.task.dir, "prompts_eval.jsonl")).readlines()) == 8
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "export")).eval()
    with torch.no_grad():
        assert torch.isfinite(exported(torch.tensor([[1, 2, 3]])).logits).all()
