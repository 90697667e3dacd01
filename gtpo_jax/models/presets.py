"""Named model configurations, from tiny test sizes up to Qwen2.5-32B, Qwen3 and Gemma 3.

Sizes of the public checkpoints are copied from their `config.json`; `load_hf` reads the
real file, so a preset is for building randomly initialised models of a known shape
(tests, benchmarks, dry runs of sharding) and for documentation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gtpo_jax.errors import UnknownName, did_you_mean
from gtpo_jax.models.families import FAMILIES
from gtpo_jax.models.transformer import FULL, SLIDING, ModelConfig, RopeScaling

# The test sizes: a few layers, a small vocabulary, GQA.
_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
_QWEN2 = dict(architecture="qwen2", qkv_bias=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
_QWEN3 = dict(
    FAMILIES["qwen3"].switches,
    architecture="qwen3",
    head_dim=128,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
)


def _gemma3(num_layers: int, sliding_window: int, **fields) -> ModelConfig:
    """Gemma 3: every 6th layer global (rope base 1e6), the others local (window, base 1e4)."""
    return ModelConfig(
        **FAMILIES["gemma3"].switches,
        architecture="gemma3",
        num_layers=num_layers,
        sliding_window=sliding_window,
        layer_types=tuple(SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)),
        head_dim=256,
        query_pre_attn_scalar=256,
        rope_theta=1_000_000.0,
        rope_local_theta=10_000.0,
        rms_norm_eps=1e-6,
        tie_embeddings=True,
        **fields,
    )


PRESETS: dict[str, ModelConfig] = {
    # Test sizes: a few layers, small vocabulary, exercise GQA, bias and tying.
    "tiny": ModelConfig(**_TINY),
    "tiny_qwen2": ModelConfig(**_TINY, tie_embeddings=True, **_QWEN2),
    "tiny_qwen3": ModelConfig(**_TINY, **(_QWEN3 | {"head_dim": 32})),
    "tiny_gemma3": ModelConfig(
        **(_TINY | {"num_layers": 3}),
        **FAMILIES["gemma3"].switches,
        architecture="gemma3",
        head_dim=32,
        sliding_window=4,
        layer_types=(SLIDING, FULL, SLIDING),
        rope_local_theta=10_000.0,
        tie_embeddings=True,
    ),
    # The embedded default's policy: a few hundred thousand parameters, trains on 2 CPU cores.
    "tiny_task": ModelConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=384,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
    ),
    "smollm2_135m": ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_embeddings=True,
        max_position_embeddings=8192,
    ),
    "llama3_2_1b": ModelConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_embeddings=True,
        max_position_embeddings=131072,
        rope_scaling=RopeScaling(
            factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        ),
    ),
    "llama3_1_8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_scaling=RopeScaling(),
    ),
    "qwen2_5_0_5b": ModelConfig(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        tie_embeddings=True,
        max_position_embeddings=32768,
        **_QWEN2,
    ),
    "qwen2_5_1_5b": ModelConfig(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        tie_embeddings=True,
        max_position_embeddings=32768,
        **_QWEN2,
    ),
    "qwen2_5_7b": ModelConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        max_position_embeddings=32768,
        **_QWEN2,
    ),
    "qwen2_5_math_7b": ModelConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        max_position_embeddings=4096,
        **(_QWEN2 | {"rope_theta": 10000.0}),
    ),
    "qwen2_5_32b": ModelConfig(
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=27648,
        num_layers=64,
        num_heads=40,
        num_kv_heads=8,
        max_position_embeddings=32768,
        **(_QWEN2 | {"rms_norm_eps": 1e-5}),
    ),
    "qwen3_0_6b": ModelConfig(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        tie_embeddings=True,
        **_QWEN3,
    ),
    "qwen3_1_7b": ModelConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        tie_embeddings=True,
        **_QWEN3,
    ),
    "qwen3_4b": ModelConfig(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        tie_embeddings=True,
        **_QWEN3,
    ),
    "qwen3_8b": ModelConfig(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        **_QWEN3,
    ),
    "gemma3_270m": _gemma3(
        18,
        512,
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_heads=4,
        num_kv_heads=1,
        max_position_embeddings=32768,
    ),
    "gemma3_1b": _gemma3(
        26,
        512,
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_heads=4,
        num_kv_heads=1,
        max_position_embeddings=32768,
    ),
    # The 4B's text tower (the vision tower is not loaded); its global layers scale rope by 8.
    "gemma3_4b": _gemma3(
        34,
        1024,
        vocab_size=262208,
        hidden_size=2560,
        intermediate_size=10240,
        num_heads=8,
        num_kv_heads=4,
        max_position_embeddings=131072,
        rope_linear_factor=8.0,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A named config, optionally with fields replaced (`param_dtype="bfloat16"`, `remat=True`)."""
    if name not in PRESETS:
        raise UnknownName(f"unknown model preset {name!r}{did_you_mean(name, PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
