"""Tokenizer wrapper: HF tokenizers from local folders, chat templates, prompt/response packing.

Prompt and response are tokenized separately and concatenated, so the response (loss) mask is exact
and a BPE merge can never straddle the boundary. Truncation keeps the end of the prompt and the start
of the response, and refuses (``TruncationError``) rather than silently drop a whole response.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Sequence, Union

import numpy as np

from sail_jax.errors import UserError
from sail_jax.locations import local_folder

Message = dict[str, str]
Prompt = Union[str, Sequence[Message]]
Response = Union[str, Sequence[Message]]

# ChatML, as used by Qwen2 and SmolLM2; the default for tokenizers we build ourselves.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TruncationError(UserError, ValueError):
    """A prompt/response pair does not fit: truncating would drop the whole response."""


@dataclasses.dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


class Tokenizer:
    """A thin, explicit layer over a HF fast tokenizer."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        if self.hf.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token; set one (e.g. in tokenizer_config.json) so responses can end")
        if self.hf.pad_token_id is None:
            # Padding is always masked out, so reusing EOS as pad is safe and what HF recipes do.
            self.hf.pad_token = self.hf.eos_token

    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        """From a folder with ``tokenizer.json``, or a Hub id / ``gs://`` path to one."""
        path = local_folder(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            raise FileNotFoundError(f"{path}: no tokenizer.json (a fast tokenizer file is required)")
        from transformers import AutoTokenizer  # 2-3 s to import (torch with it where installed): only when loading

        return cls(AutoTokenizer.from_pretrained(path, local_files_only=True))

    def save_pretrained(self, path: str) -> None:
        self.hf.save_pretrained(path)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def pad_id(self) -> int:
        return self.hf.pad_token_id

    @property
    def eos_id(self) -> int:
        return self.hf.eos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- rendering
    def render_prompt(self, prompt: Prompt) -> str:
        """Plain strings pass through; message lists go through the chat template + generation prompt."""
        if isinstance(prompt, str):
            return prompt
        self._require_template()
        return self.hf.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)

    def render_response(self, prompt: Prompt, response: Response) -> str:
        """The text that follows the rendered prompt: the assistant turn for conversations."""
        if isinstance(prompt, str):
            if not isinstance(response, str):
                raise TypeError("a plain-string prompt needs a plain-string response")
            return response
        messages = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
        prompt_text = self.render_prompt(prompt)
        full = self.hf.apply_chat_template(list(prompt) + messages, tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError(
                "the chat template renders the conversation with a different prefix than the prompt alone; "
                "cannot split prompt and response tokens for this template"
            )
        return full[len(prompt_text):]

    def _require_template(self):
        if not self.has_chat_template:
            raise ValueError("conversational (message-list) data needs a tokenizer with a chat_template")

    # ---------------------------------------------------------------- encoding
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's BOS if any.
        return self.hf.encode(self.render_prompt(prompt), add_special_tokens=isinstance(prompt, str))

    def encode_response(self, prompt: Prompt, response: Response) -> list[int]:
        """Response tokens ending exactly at EOS, as sampled responses do: a chat template's own
        end-of-turn EOS is kept (what follows it, e.g. a newline, is dropped), else EOS is appended."""
        ids = self.hf.encode(self.render_response(prompt, response), add_special_tokens=False)
        if self.eos_id in ids:
            return ids[: len(ids) - ids[::-1].index(self.eos_id)]
        return ids + [self.eos_id]

    def encode_pair(
        self, prompt: Prompt, response: Response, *, max_prompt_length: int, max_length: int, truncate: bool = False
    ) -> EncodedPair:
        """Tokenize one prompt/response. Training data is never cut: a prompt over ``max_prompt_length``
        tokens or a pair over ``max_length`` raises ``TruncationError`` (a cut response teaches the model
        to stop mid-sentence without EOS). ``truncate``: keep the prompt's last and the response's first
        tokens instead (a reward model scoring whatever text a policy wrote)."""
        prompt_ids = self.encode_prompt(prompt) if max_prompt_length > 0 else []
        response_ids = self.encode_response(prompt, response)
        if truncate:
            prompt_ids = prompt_ids[-max_prompt_length:] if max_prompt_length > 0 else []
            response_ids = response_ids[:max(max_length - len(prompt_ids), 1)]
        require_fits("the prompt", len(prompt_ids), "max_prompt_length", max_prompt_length)
        if len(prompt_ids) + len(response_ids) > max_length:
            raise TruncationError(f"prompt + response = {len(prompt_ids)} + {len(response_ids)} tokens > "
                                  f"data.max_length={max_length}; raise it")
        return EncodedPair(prompt_ids, response_ids)


def require_fits(what: str, n: int, key: str, limit: int) -> None:
    """Training data is never cut: ``what`` of ``n`` tokens over ``data.<key>`` is a ``TruncationError``."""
    if n > limit:
        raise TruncationError(f"{what} has {n} tokens > data.{key}={limit}; raise it")


def pad_left(sequences: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to ``[n, length]`` (the layout the sampler takes); returns ids and mask."""
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, seq in enumerate(sequences):
        if len(seq) > length:
            raise ValueError(f"sequence {i} has {len(seq)} tokens > length {length}")
        if len(seq):
            ids[i, length - len(seq):] = seq
            mask[i, length - len(seq):] = 1
    return ids, mask


def pack_pairs(pairs: Sequence[EncodedPair], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded ``prompt + response`` rows ``[n, length]`` with ``attention_mask`` and a
    ``loss_mask`` that is 1 on the *target* positions of response tokens (aligned with ``input_ids``:
    ``loss_mask[:, t]`` says token t is a response token, predicted by the logits at t - 1)."""
    ids = np.full((len(pairs), length), pad_id, np.int32)
    attention = np.zeros((len(pairs), length), np.int32)
    loss = np.zeros((len(pairs), length), np.int32)
    for i, pair in enumerate(pairs):
        if pair.length > length:
            raise ValueError(f"pair {i} has {pair.length} tokens > length {length}")
        n_prompt, n = len(pair.prompt_ids), pair.length
        ids[i, :n] = pair.prompt_ids + pair.response_ids
        attention[i, :n] = 1
        loss[i, n_prompt:n] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


def train_bpe_tokenizer(
    texts: Iterable[str],
    path: str | None = None,
    *,
    vocab_size: int = 512,
    chat_template: str | None = CHATML_TEMPLATE,
) -> Tokenizer:
    """Train a small byte-level BPE tokenizer offline (tests, built-in tasks), ChatML special tokens.

    Saved as a regular HF tokenizer folder when ``path`` is given.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        pad_token="<|endoftext|>", chat_template=chat_template,
    )
    tokenizer = Tokenizer(hf)
    if path is not None:
        tokenizer.save_pretrained(path)
    return tokenizer
