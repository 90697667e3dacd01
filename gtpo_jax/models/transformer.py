"""One decoder-only transformer for the Llama (2, 3) and Qwen2 / Qwen2.5 families, in Flax NNX.

RMSNorm, rotary position embeddings (configurable theta, optional Llama-3 frequency scaling),
grouped-query attention with optional q/k/v bias (Qwen2), a SwiGLU MLP, tied or untied
embeddings. Every parameter carries `logical_axes` metadata (`models/sharding.py` maps them to
a mesh). Shapes: `B` batch, `T` new tokens, `S` cache slots, `d` hidden size, `H` / `K` query /
key-value heads of size `D`.

Left padding: the caller passes `positions` (rotary position of each token, counted over the
real tokens only) and `valid` (False on padding); attention never looks at invalid keys. The
KV cache holds `S` slots per layer; a call with `T` tokens writes slots `[end, end + T)`, the
same for every row, so prompts left-padded to one length decode in lockstep.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1+ rotary frequency scaling ("rope_type": "llama3" in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters (names follow Hugging Face configs where they exist)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 = hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False  # True for Qwen2
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    param_dtype: str = "float32"  # storage dtype of the parameters: "float32" or "bfloat16"
    dtype: str = "float32"  # activation dtype; norms, softmax and rotary run in float32 regardless
    remat: bool = False  # rematerialise each layer in the backward pass (saves activation memory)
    architecture: str = "llama"  # "llama" or "qwen2": the HF architecture written on export

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim}: rotary embeddings need an even head size")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"model.{name}={getattr(self, name)!r}: expected 'float32' or 'bfloat16'")
        if self.architecture not in ("llama", "qwen2"):
            raise ValueError(f"model.architecture={self.architecture!r}: expected 'llama' or 'qwen2'")


class KVCache(NamedTuple):
    """Per-layer keys and values; `valid[b, s]` is True where slot s of row b holds a real token."""

    k: Float[Array, "L B S K D"]
    v: Float[Array, "L B S K D"]
    valid: Bool[Array, "B S"]
    end: Int[Array, ""]  # next slot to write

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int) -> KVCache:
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        return cls(zeros, zeros, jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32))


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: str, init: str) -> nnx.Param:
    key = rngs.params()
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:  # fan-in scaled normal, as HF's initializer_range for these sizes
        value = (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


class Dense(nnx.Module):
    """`x @ kernel (+ bias)`, kernel `[in, out]` with logical axes, computed in `dtype`."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], cfg: ModelConfig, *, bias: bool, rngs: nnx.Rngs):
        self.kernel = _param(rngs, (d_in, d_out), axes, cfg.param_dtype, "normal")
        self.bias = _param(rngs, (d_out,), (axes[1],), cfg.param_dtype, "zeros") if bias else None
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x: Array) -> Array:
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.scale = _param(rngs, (size,), ("norm",), cfg.param_dtype, "ones")
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> Float[Array, "D/2"]:
    """Inverse frequencies `theta^(-2i/D)`, with Llama-3 scaling when configured."""
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv
    wavelen = 2 * jnp.pi / inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, (1 - smooth) * scaled / s.factor + smooth * scaled, scaled)


def apply_rope(x: Float[Array, "B T N D"], positions: Int[Array, "B T"], inv_freq: Array) -> Array:
    """Rotate pairs (i, i + D/2) by `position * inv_freq[i]` (HF's rotate_half layout), in float32."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q = Dense(d, cfg.num_heads * hd, ("embed", "heads"), cfg, bias=cfg.qkv_bias, rngs=rngs)
        self.k = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, bias=cfg.qkv_bias, rngs=rngs)
        self.v = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, bias=cfg.qkv_bias, rngs=rngs)
        self.o = Dense(cfg.num_heads * hd, d, ("heads", "embed"), cfg, bias=False, rngs=rngs)
        self.cfg = cfg

    def __call__(
        self,
        x: Array,
        positions: Array,
        inv_freq: Array,
        keys_valid: Bool[Array, "B S"],
        query_slots: Int[Array, "T"],
        layer_cache: tuple[Array, Array] | None,
        write_at: Array,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        cfg = self.cfg
        B, T, _ = x.shape
        K, G, D = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        q = apply_rope(self.q(x).reshape(B, T, K * G, D), positions, inv_freq)
        k = apply_rope(self.k(x).reshape(B, T, K, D), positions, inv_freq)
        v = self.v(x).reshape(B, T, K, D)
        if layer_cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(layer_cache[0], k.astype(layer_cache[0].dtype), write_at, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(layer_cache[1], v.astype(layer_cache[1].dtype), write_at, axis=1)
            new_cache = (k, v)
        else:
            new_cache = None
        S = k.shape[1]
        q = q.reshape(B, T, K, G, D)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(D)
        causal = jnp.arange(S)[None, :] <= query_slots[:, None]  # [T, S]
        allowed = causal[None, None, None] & keys_valid[:, None, None, None, :]
        # A finite floor, not -inf: padded query rows (no allowed key) stay finite.
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, K * G * D)
        return self.o(out), new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate = Dense(d, f, ("embed", "mlp"), cfg, bias=False, rngs=rngs)
        self.up = Dense(d, f, ("embed", "mlp"), cfg, bias=False, rngs=rngs)
        self.down = Dense(f, d, ("mlp", "embed"), cfg, bias=False, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, inv_freq, keys_valid, query_slots, layer_cache, write_at):
        h, new_cache = self.attn(self.attn_norm(x), positions, inv_freq, keys_valid, query_slots, layer_cache, write_at)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), new_cache


class Transformer(nnx.Module):
    """Decoder-only LM. `__call__` returns final-normed hidden states; `unembedding()` the
    `[d, V]` output matrix, so that log-probs can be computed in vocabulary chunks
    (`ops/logprobs.py`) instead of materialising `[B, T, V]` logits."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype, "normal")
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _param(
                rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype, "normal"
            )

    def unembedding(self) -> Float[Array, "d V"]:
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        valid: Bool[Array, "B T"],
        cache: KVCache | None = None,
    ) -> tuple[Float[Array, "B T d"], KVCache | None]:
        cfg = self.cfg
        T = tokens.shape[1]
        x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(cfg.dtype))
        inv_freq = rope_frequencies(cfg)
        if cache is None:
            keys_valid, write_at = valid, jnp.zeros((), jnp.int32)
        else:
            keys_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, cache.end, axis=1)
            write_at = cache.end
        query_slots = write_at + jnp.arange(T)
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            step = nnx.remat(Block.__call__) if cfg.remat else Block.__call__
            x, layer_new = step(block, x, positions, inv_freq, keys_valid, query_slots, layer_cache, write_at)
            if layer_new is not None:
                new_k.append(layer_new[0])
                new_v.append(layer_new[1])
        hidden = self.final_norm(x)
        if cache is None:
            return hidden, None
        return hidden, KVCache(jnp.stack(new_k), jnp.stack(new_v), keys_valid, cache.end + T)

    def logits(self, hidden: Float[Array, "B T d"]) -> Float[Array, "B T V"]:
        """Dense float32 logits; for tests and small vocabularies only (see ops/logprobs.py)."""
        return jnp.einsum(
            "btd,dv->btv", hidden, self.unembedding().astype(hidden.dtype), preferred_element_type=jnp.float32
        )


def positions_from_valid(valid: Bool[Array, "B T"]) -> Int[Array, "B T"]:
    """Rotary positions of a left-padded batch: 0, 1, ... over the real tokens (0 on padding)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)
