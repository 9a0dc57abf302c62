"""The built-in task: "say something nice about the topic", with a programmatic oracle reward.

Prompts name a topic (``"Topic: apple. Describe it:"``); responses are short word sequences. The
oracle, which the policy only ever sees through preference labels, rewards

  +0.3       for opening with the topic word,
  +0.7 · s   where s = (#positive − #negative) / (#positive + #negative) over sentiment words,
  −0.5 · u   where u is the fraction of words outside the task vocabulary (gibberish),

so rewards lie in [−1.2, 1]. The SFT demonstrations open with the topic only 60% of the time and
pick positive and negative words evenly, so an SFT policy scores about 0.2 and leaves clear room to
improve. Everything is generated offline from a seed: no downloads.
"""

from __future__ import annotations

import numpy as np

from sail_jax.tasks import tiny_policy

TOPICS = ("apple", "river", "garden", "music", "winter", "city", "coffee", "forest", "ocean", "book",
          "train", "dog", "sunset", "bread", "mountain", "school")
POSITIVE = ("great", "lovely", "bright", "calm", "warm", "fresh", "kind", "happy", "sweet", "gentle", "clean",
            "nice")
NEGATIVE = ("awful", "dull", "cold", "noisy", "bitter", "dirty", "sad", "harsh", "stale", "gloomy", "rough",
            "ugly")
FILLERS = ("it", "is", "and", "very", "so", "quite", "the", "feels", "looks", "always", "today")
VOCABULARY = frozenset(TOPICS + POSITIVE + NEGATIVE + FILLERS)
TOPIC_BONUS, SENTIMENT_WEIGHT, GIBBERISH_PENALTY = 0.3, 0.7, 0.5
MODEL_DIR = tiny_policy.MODEL_DIR
# The run's defaults when this task builds the model: token caps its prompts and responses fit, and
# the learning rate of its tiny model (sail_jax.configs.fill_defaults).
DEFAULTS = {"data.max_prompt_length": 12, "data.max_response_length": 12, "optim.learning_rate": 3e-4}


def build_policy(config, root: str) -> str:
    """The task's policy: a tiny Qwen2-architecture model after SFT on the demonstrations."""
    return tiny_policy.build_sft_policy(config, root, corpus=tokenizer_corpus(),
                                        sft_records=sft_records(config.task.sft_examples, seed=0), name="built-in")


def make_prompt(topic: str) -> str:
    return f"Topic: {topic}. Describe it:"


def word_list(response: str) -> list[str]:
    return response.replace(".", " ").split()


def topic_of(prompt: str) -> str:
    return prompt.split("Topic: ", 1)[1].split(".", 1)[0] if "Topic: " in prompt else ""


def oracle_reward(prompt: str, response: str) -> float:
    """The task's ground-truth reward of one response (see the module docstring)."""
    words = word_list(response)
    if not words:
        return -1.0
    reward = TOPIC_BONUS if words[0] == topic_of(prompt) else 0.0
    pos = sum(w in POSITIVE for w in words)
    neg = sum(w in NEGATIVE for w in words)
    if pos + neg:
        reward += SENTIMENT_WEIGHT * (pos - neg) / (pos + neg)
    reward -= GIBBERISH_PENALTY * sum(w not in VOCABULARY for w in words) / len(words)
    return float(reward)


def prompts(n: int, seed: int, split: str = "train", *, make=make_prompt) -> list[str]:
    """``n`` prompts (``make(topic)``); train and held-out prompts differ by seed only (shared topics)."""
    del split
    rng = np.random.RandomState(seed)
    return [make(TOPICS[i]) for i in rng.randint(len(TOPICS), size=n)]


def sentiment_words(rng: np.random.RandomState, count: int) -> list[str]:
    """``count`` sentiment words joined by fillers, each positive with probability 1/2."""
    words = []
    for i in range(count):
        if i:
            words.append(str(rng.choice(["and", "so", "very"])))
        words.append(str(rng.choice(POSITIVE if rng.rand() < 0.5 else NEGATIVE)))
    return words


def demonstration(prompt: str, rng: np.random.RandomState) -> str:
    """An SFT response: topic first 60% of the time, 1-3 sentiment words, each positive w.p. 1/2."""
    words = [topic_of(prompt) if rng.rand() < 0.6 else str(rng.choice(["it", "the"]))]
    words += [str(rng.choice(["is", "feels", "looks"]))]
    return " " + " ".join(words + sentiment_words(rng, rng.randint(1, 4))) + "."


def sft_records(n: int, seed: int, *, make=make_prompt, demonstrate=demonstration) -> list[dict]:
    """``n`` SFT rows ``{prompt, response}``: ``make``'s prompts answered by ``demonstrate``."""
    rng = np.random.RandomState(seed + 1)
    return [{"prompt": p, "response": demonstrate(p, rng)} for p in prompts(n, seed, make=make)]


def tokenizer_corpus() -> list[str]:
    """Texts that give every task word its own BPE token."""
    rng = np.random.RandomState(0)
    texts = [make_prompt(t) for t in TOPICS] + [" " + " ".join(VOCABULARY) + "."]
    texts += [r["response"] for r in sft_records(400, 0)]
    return [t for t in texts for _ in range(3)] + [" ".join(rng.permutation(sorted(VOCABULARY)))]
