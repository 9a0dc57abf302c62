"""A built-in task with headroom: "praise the topic with as many different nice words as you can".

Prompts read ``"Topic: apple. Praise it:"``; responses use the built-in task's words. The oracle,

  +0.125 per distinct positive word (up to 8),  −0.25 per negative word,  −0.5 × gibberish fraction,

clipped to [−1, 1], so an oracle-optimal policy (eight different positive words, nothing negative)
scores 1.0. The SFT demonstrations praise half-heartedly: one to four sentiment words, each positive
with probability 1/2, so SFT scores about −0.1 and its samples rarely hold more than three positive
words. The offline pairs are labelled SFT samples, so they say little about responses longer than the
SFT policy writes; a method that keeps sampling from the improving policy can climb further. That is
the gap the task exists to measure (the built-in task saturates near 0.7 for every method).
"""

from __future__ import annotations

import numpy as np

from sail_jax.tasks import builtin, tiny_policy

POSITIVE, NEGATIVE, VOCABULARY = builtin.POSITIVE, builtin.NEGATIVE, builtin.VOCABULARY
PER_WORD, MAX_WORDS, NEGATIVE_COST, GIBBERISH_PENALTY = 0.125, 8, 0.25, 0.5
MODEL_DIR = tiny_policy.MODEL_DIR
DEFAULTS = builtin.DEFAULTS


def make_prompt(topic: str) -> str:
    return f"Topic: {topic}. Praise it:"


def oracle_reward(prompt: str, response: str) -> float:
    """The task's ground-truth reward of one response (see the module docstring)."""
    del prompt  # every topic is praised the same way
    words = builtin.word_list(response)
    if not words:
        return -1.0
    distinct_positive = len({w for w in words if w in POSITIVE})
    reward = PER_WORD * min(distinct_positive, MAX_WORDS) - NEGATIVE_COST * sum(w in NEGATIVE for w in words)
    reward -= GIBBERISH_PENALTY * sum(w not in VOCABULARY for w in words) / len(words)
    return float(np.clip(reward, -1.0, 1.0))


def optimal_response(prompt: str) -> str:
    """What an oracle-optimal policy writes (reward 1.0; ten tokens with the end of sequence)."""
    del prompt
    return " " + " ".join(POSITIVE[:MAX_WORDS]) + "."


def prompts(n: int, seed: int, split: str = "train") -> list[str]:
    return builtin.prompts(n, seed, split, make=make_prompt)


def demonstration(prompt: str, rng: np.random.RandomState) -> str:
    """An SFT response: topic or "it", a verb, then 1-4 sentiment words, each positive w.p. 1/2."""
    words = [builtin.topic_of(prompt) if rng.rand() < 0.5 else "it", str(rng.choice(["is", "feels", "looks"]))]
    return " " + " ".join(words + builtin.sentiment_words(rng, rng.randint(1, 5))) + "."


def sft_records(n: int, seed: int) -> list[dict]:
    return builtin.sft_records(n, seed, make=make_prompt, demonstrate=demonstration)


def tokenizer_corpus() -> list[str]:
    """The built-in task's corpus plus this task's prompts and demonstrations."""
    return builtin.tokenizer_corpus() + [make_prompt(t) for t in builtin.TOPICS] * 3 + [
        r["response"] for r in sft_records(400, 0)]


def build_policy(config, root: str) -> str:
    """The task's policy: a tiny Qwen2-architecture model after SFT on the demonstrations."""
    return tiny_policy.build_sft_policy(config, root, corpus=tokenizer_corpus(),
                                        sft_records=sft_records(config.task.sft_examples, seed=0), name="praise")
