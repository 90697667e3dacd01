"""Prompts as token ids: chat rendering (cached per prompt text), and the one left-padder.

`PromptEncoder(record) -> ids` renders a record's prompt (system message, the record's text plus a
suffix, the tokenizer's chat template) and caches the ids by prompt text, so a prompt drawn again
in a later step, or in evaluation, is tokenized once. `pad_prompts` left-pads a batch of id lists
to the smallest of a few bucket widths, bounding compilations: the rollout pads a step's prompts
with it once, and the sampler and the scoring pass reuse the same arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gtpo_jax.data.tokenizer import Tokenizer


def render_prompt(tok: Tokenizer, record: dict[str, Any], *, template: str, system_prompt: str, suffix: str) -> str:
    """The chat text of a record: optional system message, then the user turn `prompt + suffix`."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return tok.render_chat(system + [{"role": "user", "content": record["prompt"] + suffix}], template=template)


class PromptEncoder:
    """`encoder(record) -> token ids` of the rendered prompt, cached by prompt text (ids of a
    training file and a held-out file may coincide, their texts do not)."""

    def __init__(self, tok: Tokenizer, *, template: str, system_prompt: str = "", suffix: str = ""):
        self.tok, self.template, self.system_prompt, self.suffix = tok, template, system_prompt, suffix
        self._cache: dict[str, list[int]] = {}

    def __call__(self, record: dict[str, Any]) -> list[int]:
        key = record["prompt"]
        if key not in self._cache:
            text = render_prompt(
                self.tok, record, template=self.template, system_prompt=self.system_prompt, suffix=self.suffix
            )
            self._cache[key] = self.tok.encode(text)
        return self._cache[key]


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `length` tokens."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"prompt of {length} tokens is longer than the largest prompt bucket {buckets[-1]}")


def pad_prompts(prompts: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to the bucket of the longest: `(tokens [P, Lp] int32, valid [P, Lp] bool)`."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    width = bucket_length(max(len(p) for p in prompts), buckets)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = p
        valid[i, width - len(p) :] = True
    return tokens, valid
