"""What the Tunix runners share: a tokenizer that passes token ids through, and the model loader.

Imported by `tunix_sampler_run.py` and `tunix_step_run.py`, which run in the environment where
google-tunix is installed (never ours: it pins other versions); it does not import gtpo_jax.

`IdsTokenizer` makes Tunix see exactly the prompt token ids our side sees: Tunix's sampler and
`GRPOLearner` take prompts as strings and tokenise them (its HF tokenizer adds a BOS token, one
more prompt token than ours). Tunix accepts any tokenizer object with `encode`, `decode`,
`bos_id`, `eos_id` and `pad_id` (its `TokenizerAdapter`); this one reads a prompt string
"17 4 803 ..." back as those ids, adds no BOS (`bos_id()` is None), and has no end-of-sequence
id (-1 is never sampled), so every response runs to the length limit, as ours do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


class IdsTokenizer:
    """Token ids written as decimal words: `encode("5 9") == [5, 9]`; no BOS, no EOS."""

    def __init__(self, pad_id: int):
        self._pad = int(pad_id)

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(x) for x in str(text).split()]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return -1

    def pad_id(self) -> int:
        return self._pad


def as_text(ids) -> str:
    return " ".join(str(int(i)) for i in ids)


def prompt_sha(rows) -> str:
    """Fingerprint of the `[rows, Lp]` prompt token matrix a sampler decoded from (the same
    function as `sampler_bench.prompt_sha`)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(rows, np.int32)).tobytes()).hexdigest()[:16]


def load_llama(checkpoint: str, mesh=None):
    """Tunix's Llama-3 model (SmolLM2 is one) from a HF safetensors directory, and its config."""
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params as llama3_params

    hf = json.loads((Path(checkpoint) / "config.json").read_text())
    cfg = llama3.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(hf["rope_theta"]),
        norm_eps=hf["rms_norm_eps"],
        weight_tying=hf["tie_word_embeddings"],
    )
    return llama3_params.create_model_from_safe_tensors(checkpoint, cfg, mesh=mesh), cfg
