"""A Hugging Face `tokenizers.Tokenizer` rebuilt from a GGUF file's vocabulary (`models/gguf.py`).

Two llama.cpp tokenizer models are handled:

- "gpt2": byte-level BPE; the file carries the merges (SmolLM2, Qwen).
- "llama": SentencePiece BPE with byte fallback (Gemma). The file carries pieces and scores,
  not merges; SentencePiece merges the adjacent pair whose merged piece scores highest, so the
  merges are every split `a + b` of a normal piece into two pieces of the vocabulary, ranked by
  the merged piece's score (ties by id). Spaces are written `▁`, bytes without a piece fall back
  to `<0xNN>` pieces, and no space is prefixed when `add_space_prefix` is false.

Control tokens (type 3) become special tokens, user-defined ones (type 4, e.g. Gemma's runs of
newlines) added tokens matched whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

NORMAL_TOKEN, CONTROL_TOKEN, USER_TOKEN, BYTE_TOKEN = 1, 3, 4, 6  # llama.cpp token types

Field = Callable[..., Any]  # field(key, default=None) -> the metadata value


def _byte_level_bpe(field: Field, tokens: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(str(m).split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-ordered merging (see the module docstring)."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL_TOKEN}
    ranked = []
    for piece, i in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(field: Field, tokens: list[str], types: list[int]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = [float(s) for s in field("tokenizer.ggml.scores")]
    unk = field("tokenizer.ggml.unknown_token_id")
    model = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=sentencepiece_merges(tokens, scores, types),
        unk_token=None if unk is None else tokens[int(unk)],
        fuse_unk=True,
        byte_fallback=True,
        ignore_merges=False,
    )
    tok = Tokenizer(model)
    steps = [normalizers.Replace(" ", "▁")]
    if field("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def gguf_tokenizer(field: Field, fallback_chat_template: str | None = None) -> tuple[Any, dict]:
    """A `tokenizers.Tokenizer` and `tokenizer_config.json` contents for a GGUF file."""
    from tokenizers import AddedToken

    model = field("tokenizer.ggml.model")
    tokens = [str(t) for t in field("tokenizer.ggml.tokens")]
    types = [int(t) for t in field("tokenizer.ggml.token_type", [NORMAL_TOKEN] * len(tokens))]
    if model == "gpt2":
        tok = _byte_level_bpe(field, tokens)
    elif model == "llama":
        tok = _sentencepiece_bpe(field, tokens, types)
    else:
        raise ValueError(
            f"GGUF tokenizer.ggml.model={model!r}: expected 'gpt2' (byte-level BPE) or 'llama' (SentencePiece)"
        )
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == CONTROL_TOKEN
        ]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types, strict=True) if k == USER_TOKEN]
    )

    def token(key: str) -> str | None:
        i = field(key)
        return None if i is None else tokens[int(i)]

    config = {
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False)),
        "chat_template": field("tokenizer.chat_template") or fallback_chat_template,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return tok, config
