"""A verifiable instruction-following task in the style of IFEval, generated offline.

Each prompt is an everyday request plus one or two constraints a program can check ("answer in all
lowercase", "do not use any commas", "use exactly 3 bullet points", ...). The instruction sentences
are the single source of truth: ``constraints_of`` parses them back out of the prompt text, so the
oracle scores any (prompt, response) pair, including prompts written by hand.

The oracle reward is the fraction of the prompt's constraints the response satisfies; the online
loop and the evaluator subtract ``reward.missing_eos_penalty`` from responses that never finished.
Requests and constraint arguments are split disjointly between train and held-out prompts, so
held-out scores measure instruction following, not memorised prompts.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Sequence

import numpy as np

MODEL_DIR = "model"
# The run's defaults: token caps for the task's chat prompts and the instruct model's answers, and
# SmolLM2-135M-Instruct's learning rate (sail_jax.configs.fill_defaults).
DEFAULTS = {"data.max_prompt_length": 80, "data.max_response_length": 48, "optim.learning_rate": 1e-5}

REQUESTS = [
    "Write a short note to my neighbour about {topic}.",
    "Give me some advice about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Describe {topic} in a few sentences.",
    "Write a short message to a friend about {topic}.",
    "Tell me why {topic} matters.",
    "Write a brief product description related to {topic}.",
    "Summarize what people should know about {topic}.",
]
TOPICS = [
    "watering houseplants", "a rainy weekend", "learning to cook rice", "saving money on groceries",
    "morning walks", "recycling at home", "a lost umbrella", "keeping a journal", "riding a bicycle to work",
    "drinking enough water", "a new coffee shop", "planning a picnic", "reading before bed", "visiting a museum",
    "fixing a leaky tap", "adopting a cat", "a noisy party next door", "growing tomatoes", "packing for a trip",
    "learning a second language", "a power cut", "baking bread", "cleaning the kitchen", "a birthday gift",
    "stretching after exercise", "the first day of school", "a broken phone screen", "sharing a car",
    "winter clothes", "a visit to the dentist", "writing a thank-you card", "choosing a good book",
]
WORDS = ["simple", "happy", "green", "quickly", "bright", "careful", "together", "today", "small", "fresh",
         "calm", "friendly", "early", "warm", "clear", "gentle"]
PHRASES = ["Have a nice day.", "That is all.", "Hope this helps.", "Thank you.", "See you soon.", "Good luck."]


def _word_count(text: str) -> int:
    return len(re.findall(r"[A-Za-z0-9']+", text))


def _bullets(text: str) -> int:
    return sum(1 for line in text.splitlines() if re.match(r"\s*[-*•]\s+\S", line))


def _first_word(text: str) -> str:
    m = re.match(r"\W*([A-Za-z']+)", text)
    return m.group(1).lower() if m else ""


@dataclasses.dataclass(frozen=True)
class Constraint:
    """One checkable instruction: how to write it, how to find it in a prompt, how to check it."""

    name: str
    template: str  # instruction sentence; {arg} is the argument, if any
    pattern: str  # regex that finds the instruction (and its argument as group 1) in a prompt
    check: Callable[[str, str], bool]  # (response, arg) -> satisfied
    args: Sequence = ()  # the argument values prompts draw from
    conflicts: tuple[str, ...] = ()

    def instruction(self, arg) -> str:
        return self.template.format(arg=arg)


CONSTRAINTS = {c.name: c for c in [
    Constraint("lowercase", "Your entire answer must be in lowercase letters.",
               r"Your entire answer must be in lowercase letters\.",
               lambda r, _: any(ch.isalpha() for ch in r) and r == r.lower(), conflicts=("start_word",)),
    Constraint("no_commas", "Do not use any commas in your answer.", r"Do not use any commas in your answer\.",
               lambda r, _: "," not in r),
    Constraint("include_word", 'Include the word "{arg}" in your answer.',
               r'Include the word "([^"]+)" in your answer\.',
               lambda r, w: re.search(rf"\b{re.escape(w)}\b", r, re.IGNORECASE) is not None, args=WORDS),
    Constraint("start_word", 'Start your answer with the word "{arg}".', r'Start your answer with the word "([^"]+)"\.',
               lambda r, w: _first_word(r) == w.lower(), args=[w.capitalize() for w in WORDS],
               conflicts=("lowercase", "bullets")),
    Constraint("end_phrase", 'End your answer with the exact phrase "{arg}"',
               r'End your answer with the exact phrase "([^"]+)"',
               lambda r, p: r.rstrip().endswith(p), args=PHRASES),
    Constraint("max_words", "Answer in fewer than {arg} words.", r"Answer in fewer than (\d+) words\.",
               lambda r, n: 0 < _word_count(r) < int(n), args=[15, 20, 25, 30, 40]),
    Constraint("bullets", "Use exactly {arg} bullet points, each on its own line starting with \"- \".",
               r"Use exactly (\d+) bullet points", lambda r, n: _bullets(r) == int(n), args=[2, 3, 4],
               conflicts=("start_word",)),
]}


def constraints_of(prompt) -> list[tuple[Constraint, str | None]]:
    """The constraints stated in a prompt (a string or a chat message list), with their arguments."""
    text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt if m["role"] == "user")
    found = []
    for c in CONSTRAINTS.values():
        m = re.search(c.pattern, text)
        if m:
            found.append((c, m.group(1) if m.groups() else None))
    return found


def satisfied(prompt, response: str) -> list[bool]:
    return [c.check(response, arg) for c, arg in constraints_of(prompt)]


def oracle_reward(prompt, response: str) -> float:
    """Fraction of the prompt's constraints the response satisfies (0 for a prompt with none)."""
    checks = satisfied(prompt, response)
    return float(np.mean(checks)) if checks else 0.0


def _split(items: Sequence, split: str) -> list:
    """Even positions train, odd positions held out: disjoint requests, topics and arguments."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; valid: 'train', 'eval'")
    return list(items[0 if split == "train" else 1::2])


def prompts(n: int, seed: int, split: str = "train", max_constraints: int = 2) -> list[list[dict]]:
    """``n`` chat prompts (one user message each) with 1..max_constraints non-conflicting constraints."""
    rng = np.random.RandomState(seed)
    requests, topics = _split(REQUESTS, split), _split(TOPICS, split)
    out = []
    for _ in range(n):
        text = requests[rng.randint(len(requests))].format(topic=topics[rng.randint(len(topics))])
        chosen: list[Constraint] = []
        names = list(CONSTRAINTS)
        for name in rng.permutation(names)[: rng.randint(1, max_constraints + 1)]:
            c = CONSTRAINTS[name]
            if any(name in other.conflicts or other.name in c.conflicts for other in chosen):
                continue
            chosen.append(c)
        for c in chosen:
            arg = None
            if c.args:
                values = _split(c.args, split) if len(c.args) > 2 else list(c.args)
                arg = values[rng.randint(len(values))]
            text += " " + c.instruction(arg)
        out.append([{"role": "user", "content": text}])
    return out


def build_policy(config, root: str) -> str:
    """The task's policy: a GGUF instruct model (default SmolLM2-135M-Instruct) as it is, no SFT."""
    from sail_jax.models.gguf import bundled_smollm2, ensure_converted

    return ensure_converted(config.task.get("gguf") or bundled_smollm2(), os.path.join(root, MODEL_DIR))
