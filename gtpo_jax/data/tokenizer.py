"""One tokenizer interface over sentencepiece models, Hugging Face `tokenizers`, and characters.

- `HFTokenizer`: a `tokenizer.json` (any `tokenizers` model; the byte-level BPE that
  `models/gguf.py` rebuilds from GGUF metadata included, its control tokens registered as
  special tokens) plus the checkpoint's `tokenizer_config.json` (bos / eos / pad tokens and
  the Jinja `chat_template`).
- `SentencePieceTokenizer`: a `.model` file (Llama 2, Gemma, T5 style).
- `CharTokenizer`: one id per character of a fixed alphabet, for the built-in synthetic tasks
  and the tiny embedded default (no download, no training).

Every tokenizer gives `encode`, `decode` (drops padding and, by default, special tokens),
`encode_prompts` (batch encode, left-padded for the sampler) and `render_chat`. Chat
prompts are rendered with the checkpoint's own Jinja template when it has one (the way
`transformers` renders it: sandboxed Jinja with `trim_blocks` / `lstrip_blocks`), otherwise
with a plain template named in the config (`CHAT_TEMPLATES`).

`stop_ids` (the ids that end a sampled response) are eos plus the end-of-turn tokens of the
checkpoint's model family (`models/families.py`: `<|im_end|>` for Qwen, `<end_of_turn>` for
Gemma 3, ...), read from the `config.json` beside the tokenizer (also written by the GGUF
converter) or given as `stop_tokens`; with neither, eos alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Message = dict[str, str]

# Plain templates for checkpoints without a Jinja `chat_template` (and for the tiny default).
CHAT_TEMPLATES: dict[str, str] = {
    # ChatML, as used by Qwen2/2.5 and SmolLM2 (no default system prompt).
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
        "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Base models: the user turns' text, then the assistant cue.
    "plain": (
        "{% for message in messages %}{% if message['role'] == 'user' %}Question: {{ message['content'] }}\n"
        "{% elif message['role'] == 'assistant' %}Answer: {{ message['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Answer: {% endif %}"
    ),
    # The user's text alone (the tiny default: a compact prompt the model reads directly).
    "raw": "{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}={% endif %}",
}


def _raise(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def render_template(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True, **extra) -> str:
    """Renders a Jinja chat template as `transformers`' `apply_chat_template(tokenize=False)` does."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.globals["raise_exception"] = _raise
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **extra
    )


class Tokenizer:
    """Shared behaviour; subclasses implement `_encode`, `_decode`, `vocab_size` and the ids."""

    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int = 0
    special_ids: frozenset[int] = frozenset()
    add_bos: bool = False
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    stop_tokens: tuple[str, ...] = ()  # the model family's end-of-turn tokens (besides eos)

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self._encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = True) -> str:
        """Text of `ids`, with padding dropped (and special tokens unless `skip_special=False`)."""
        drop = {self.pad_id} | (set(self.special_ids) if skip_special else set())
        return self._decode([int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in drop])

    def encode_prompts(
        self, texts: Sequence[str], *, max_len: int | None = None, pad_to: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded `(tokens [B, L], valid [B, L])`; `L` = `pad_to` or the longest prompt.

        A prompt longer than `max_len` raises (the data pipeline filters those before).
        """
        encoded = [self.encode(t) for t in texts]
        longest = max((len(e) for e in encoded), default=0)
        if max_len is not None and longest > max_len:
            i = max(range(len(encoded)), key=lambda k: len(encoded[k]))
            raise ValueError(f"prompt {i} has {len(encoded[i])} tokens, more than max_len={max_len}")
        width = pad_to if pad_to is not None else longest
        if width < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt ({longest} tokens)")
        tokens = np.full((len(texts), width), self.pad_id, np.int32)
        valid = np.zeros((len(texts), width), bool)
        for row, ids in enumerate(encoded):
            if ids:
                tokens[row, width - len(ids) :] = ids
                valid[row, width - len(ids) :] = True
        return tokens, valid

    def render_chat(
        self, messages: Sequence[Message], *, template: str | None = None, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text: the checkpoint's Jinja template, else the named plain `template`."""
        source = self.chat_template
        if source is None:
            if template is None:
                raise ValueError(
                    f"this tokenizer has no chat_template; name one of {sorted(CHAT_TEMPLATES)} (data.chat_template)"
                )
            if template not in CHAT_TEMPLATES:
                raise ValueError(f"unknown chat template {template!r}; known: {sorted(CHAT_TEMPLATES)}")
            source = CHAT_TEMPLATES[template]
        return render_template(
            source,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def token_id(self, token: str) -> int | None:
        """The id of one whole token, or None when the vocabulary lacks it."""
        return None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end a response: eos and the family's `stop_tokens` in the vocabulary."""
        ids = {self.eos_id} | {self.token_id(t) for t in self.stop_tokens}
        return tuple(sorted(i for i in ids if i is not None))


def family_stop_tokens(directory: str | os.PathLike) -> tuple[str, ...]:
    """End-of-turn tokens of the model family named by `directory/config.json`; () when the
    directory has none or names a family gtpo_jax does not know."""
    from gtpo_jax.models.families import family_of_hf

    path = Path(directory) / "config.json"
    if not path.exists():
        return ()
    try:
        return family_of_hf(json.loads(path.read_text())).stop_tokens
    except ValueError:
        return ()


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` with the checkpoint's `tokenizer_config.json`."""

    def __init__(self, tokenizer: Any, config: dict[str, Any] | None = None, *, stop_tokens: Sequence[str] = ()):
        self.tok = tokenizer
        self.stop_tokens = tuple(stop_tokens)
        config = config or {}

        def token_id(key: str) -> int | None:
            value = config.get(key)
            if isinstance(value, dict):  # {"content": "<|im_end|>", ...} in newer configs
                value = value.get("content")
            if value is None:
                return None
            found = tokenizer.token_to_id(value)
            if found is None:
                raise ValueError(f"tokenizer_config {key}={value!r} is not in the vocabulary")
            return found

        self.bos_id, self.eos_id = token_id("bos_token"), token_id("eos_token")
        pad = token_id("pad_token")
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.bos_token = tokenizer.id_to_token(self.bos_id) if self.bos_id is not None else ""
        self.eos_token = tokenizer.id_to_token(self.eos_id) if self.eos_id is not None else ""
        self.add_bos = bool(config.get("add_bos_token", False))
        self.chat_template = config.get("chat_template")
        self.special_ids = frozenset(
            tokenizer.token_to_id(t.content) for t in tokenizer.get_added_tokens_decoder().values() if t.special
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike, *, stop_tokens: Sequence[str] | None = None) -> HFTokenizer:
        """Reads `tokenizer.json` and (if present) `tokenizer_config.json` of a checkpoint directory;
        `stop_tokens` default to those of the family its `config.json` names."""
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json (a Hugging Face tokenizers file is expected)")
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        stops = family_stop_tokens(path) if stop_tokens is None else stop_tokens
        return cls(_Tok.from_file(str(path / "tokenizer.json")), config, stop_tokens=stops)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file; its control ids (bos / eos / pad / unk) come from the model."""

    def __init__(
        self,
        model_file: str | os.PathLike,
        *,
        add_bos: bool = True,
        chat_template: str | None = None,
        stop_tokens: Sequence[str] = (),
    ):
        import sentencepiece as spm

        if not Path(model_file).exists():
            raise FileNotFoundError(f"{model_file}: no such sentencepiece model")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        as_id = lambda i: i if i >= 0 else None  # noqa: E731  sentencepiece uses -1 for "none"
        self.bos_id, self.eos_id = as_id(self.sp.bos_id()), as_id(self.sp.eos_id())
        pad = as_id(self.sp.pad_id())
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.bos_token = self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else ""
        self.eos_token = self.sp.id_to_piece(self.eos_id) if self.eos_id is not None else ""
        self.special_ids = frozenset(i for i in range(self.sp.get_piece_size()) if self.sp.is_control(i))
        self.stop_tokens = tuple(stop_tokens)

    def token_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)  # the unknown-piece id for a string that is no piece
        return i if self.sp.id_to_piece(i) == token else None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def _decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class CharTokenizer(Tokenizer):
    """One token per character of `alphabet`; id 0 is padding, 1 is end of response.

    For the built-in synthetic tasks: a character the alphabet lacks raises, naming it.
    """

    PAD, EOS = "<pad>", "<eos>"

    def __init__(self, alphabet: str, *, chat_template: str | None = None):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("CharTokenizer alphabet has repeated characters")
        self.alphabet = alphabet
        self.index = {c: i + 2 for i, c in enumerate(alphabet)}
        self.pad_id, self.eos_id, self.bos_id = 0, 1, None
        self.eos_token = self.EOS
        self.special_ids = frozenset({0, 1})
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 2

    def _encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's alphabet {self.alphabet!r}") from None

    def _decode(self, ids: list[int]) -> str:
        # Ids outside the vocabulary (a model with a larger embedding) decode as U+FFFD.
        return "".join(
            (self.alphabet[i - 2] if i - 2 < len(self.alphabet) else "\ufffd")
            if i >= 2
            else (self.EOS if i == 1 else "")
            for i in ids
        )


# The characters of the synthetic tasks' compact prompts and answers (see data/tasks.py).
TASK_ALPHABET = "0123456789+-*/()=\\boxed{} ,.>"


def load_tokenizer(
    kind: str, path: str = "", *, chat_template: str | None = None, stop_tokens: Sequence[str] | None = None
) -> Tokenizer:
    """`kind`: "hf" (checkpoint dir with tokenizer.json), "sentencepiece" (.model file) or "char".

    `stop_tokens` (end-of-turn tokens besides eos) default to those of the model family named by
    the `config.json` in the checkpoint directory (beside the .model file for sentencepiece).
    """
    if kind == "hf":
        return HFTokenizer.from_dir(path, stop_tokens=stop_tokens)
    if kind == "sentencepiece":
        stops = family_stop_tokens(Path(path).parent) if stop_tokens is None else stop_tokens
        return SentencePieceTokenizer(path, chat_template=chat_template, stop_tokens=stops)
    if kind == "char":
        return CharTokenizer(path or TASK_ALPHABET, chat_template=chat_template)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'hf', 'sentencepiece' or 'char'")
