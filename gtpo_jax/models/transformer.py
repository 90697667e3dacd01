"""One decoder-only transformer for the Llama, Qwen2, Qwen3 and Gemma 3 families, in Flax NNX.

RMSNorm (`w * x` or Gemma's `(1 + w) * x`), rotary position embeddings (configurable theta,
Llama-3 or linear frequency scaling, a second base for sliding-window layers), grouped-query
attention with optional q/k/v bias (Qwen2), optional per-head QK-norm (Qwen3, Gemma 3), optional
sliding-window layers (Gemma 3's local layers), optional LoRA adapters on any projection
(`lora_rank`; models/lora.py), a gated MLP (SiLU or tanh-GELU), optional norms
after attention and MLP (Gemma 3), tied or untied embeddings, optionally scaled by `sqrt(d)`.
The model reads only these switches of `ModelConfig`; which family sets which is recorded in
`models/families.py`. Every parameter carries `logical_axes` metadata (`models/sharding.py`
maps them to a mesh). Shapes: `L` layers, `B` batch, `T` new tokens, `S` cache slots, `d`
hidden size, `H` / `K` query / key-value heads of size `D`.

The layers are one `Block` whose parameters are stacked along a leading `layers` axis `[L, ...]`
and run under `jax.lax.scan`: one layer is compiled whatever the depth. Each layer's attention
kind (full or sliding window) is a scanned flag, not a Python branch.

Left padding: the caller passes `positions` (rotary position of each token, counted over the
real tokens only) and `valid` (False on padding); attention never looks at invalid keys. The
KV cache holds `S` slots per layer; a call with `T` tokens writes slots `[end, end + T)`, the
same for every row, so prompts left-padded to one length decode in lockstep. A sliding window
of `W` lets a query in slot `s` see keys in slots `(s - W, s]` (real tokens of a left-padded
row sit in consecutive slots, so this is the window in positions too).

Attention is `models/attention.py`: dense `[T, S]` float32 scores for short sequences, a
blockwise online softmax (`cfg.attention`, `cfg.attention_block`) for long ones.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gtpo_jax.models.attention import KINDS, Mask, attend

FULL, SLIDING = "full_attention", "sliding_attention"  # layer kinds, named as in HF `layer_types`
# The model families this decoder implements; models/families.py describes each (and checks it covers them).
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}
# The projections a LoRA adapter can wrap, named as the `Dense` attributes of `Attention` and `MLP`.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


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
    rope_linear_factor: float = 1.0  # positions / factor on full-attention layers (Gemma 3 4B: 8)
    rope_local_theta: float = 0.0  # rotary base of sliding-window layers; 0 = rope_theta
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # RMSNorm over each query / key head before rotary (Qwen3, Gemma 3)
    norm_plus_one: bool = False  # norms compute (1 + w) * x, w initialised at 0 (Gemma)
    post_norms: bool = False  # norms after attention and after the MLP too (Gemma 3)
    activation: str = "silu"  # gated MLP activation: "silu" or "gelu_tanh" (Gemma)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    query_pre_attn_scalar: int = 0  # attention scores / sqrt(this); 0 = head_dim (all but Gemma)
    sliding_window: int = 0  # keys a sliding-window layer sees (itself included); 0 = none
    layer_types: tuple[str, ...] = ()  # FULL or SLIDING per layer; () = all FULL
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    param_dtype: str = "float32"  # storage dtype of the parameters: "float32" or "bfloat16"
    dtype: str = "float32"  # activation dtype; norms, softmax and rotary run in float32 regardless
    remat: bool = False  # rematerialise each layer in the backward pass (saves activation memory)
    # "dense" ([T, S] float32 scores), "blockwise" (online softmax in attention_block tiles) or "auto":
    # blockwise when T * S > attention_auto_len**2 (models/attention.py).
    attention: str = "auto"
    attention_block: int = 512
    attention_auto_len: int = 2048
    architecture: str = "llama"  # one of ARCHITECTURES; models/families.py holds each one's names, config.json, GGUF
    # LoRA (models/lora.py): rank 0 = none; else each projection named in `lora_targets` adds
    # `(alpha / rank) * dropout(x) @ A @ B`, A `[in, rank]` and B `[rank, out]` float32 (B starts at 0).
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_dropout: float = 0.0  # applied to the adapter's input in the update's forward pass only

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.query_pre_attn_scalar == 0:
            object.__setattr__(self, "query_pre_attn_scalar", self.head_dim)
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
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={self.activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        object.__setattr__(self, "layer_types", tuple(self.layer_types) or (FULL,) * self.num_layers)
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - {FULL, SLIDING}:
            raise ValueError(
                f"model.layer_types={self.layer_types!r}: expected {self.num_layers} entries, "
                f"each {FULL!r} or {SLIDING!r}"
            )
        if (SLIDING in self.layer_types) != (self.sliding_window > 0):
            raise ValueError(
                f"model.sliding_window={self.sliding_window}: must be > 0 exactly when layer_types has {SLIDING!r}"
            )
        if self.rope_linear_factor <= 0:
            raise ValueError(f"model.rope_linear_factor={self.rope_linear_factor}: must be > 0")
        if self.attention not in KINDS:
            raise ValueError(f"model.attention={self.attention!r}: expected one of {', '.join(KINDS)}")
        if self.attention_block < 1 or self.attention_auto_len < 1:
            raise ValueError("model.attention_block and model.attention_auto_len must be >= 1")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"model.architecture={self.architecture!r}: expected one of {', '.join(ARCHITECTURES)}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.lora_rank < 0 or set(self.lora_targets) - set(LORA_TARGETS) or not 0 <= self.lora_dropout < 1:
            raise ValueError(
                f"model.lora_rank={self.lora_rank}, lora_targets={self.lora_targets!r}, lora_dropout="
                f"{self.lora_dropout}: expected rank >= 0, targets among {', '.join(LORA_TARGETS)}, dropout in [0, 1)"
            )


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


BATCH_AXES = ("data", "fsdp")  # the mesh axes that split rows (models/sharding.py DEFAULT_RULES["batch"])


def shard_rows(x: Array, axis: int = 0) -> Array:
    """`x` with dimension `axis` (its rows) split over the batch axes of the mesh set by
    `jax.set_mesh`, when they divide it; unchanged without a mesh. Without this, XLA's sharding
    propagation lets the FSDP-sharded embedding dimension of the weights win over the batch, and
    every device computes the whole batch's activations (full `[B, T, mlp]` buffers per device)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in BATCH_AXES if not mesh.empty and mesh.shape.get(a, 1) > 1)
    width = 1
    for a in axes:
        width *= mesh.shape[a]
    if not axes or x.shape[axis] % width:
        return x
    spec = [None] * x.ndim
    spec[axis] = axes
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: str, init: str) -> nnx.Param:
    return _param_from(rngs.params(), shape, axes, dtype, init)


def _param_from(key: Array, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: str, init: str) -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "lora_a":  # PEFT's default: kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in))
        value = jax.random.uniform(key, shape, dtype, -(shape[0] ** -0.5), shape[0] ** -0.5)
    else:  # fan-in scaled normal, as HF's initializer_range for these sizes
        value = (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


def _fold(key: Array | None, i: int) -> Array | None:
    return None if key is None else jax.random.fold_in(key, i)


class Dense(nnx.Module):
    """`x @ kernel (+ bias)`, kernel `[in, out]` with logical axes, computed in `dtype`; plus a
    LoRA adapter when `name` is one of `cfg.lora_targets` (and `cfg.lora_rank > 0`).

    The adapter's A is drawn from a key folded out of the kernel's, so a seed gives the same base
    weights with or without adapters. It runs in float32 whatever the base's dtypes; with B = 0
    it adds an exact 0, so the output equals the base's bit for bit."""

    def __init__(
        self, d_in: int, d_out: int, axes: tuple[str, str], cfg: ModelConfig, *, bias: bool, rngs: nnx.Rngs, name: str
    ):
        key = rngs.params()
        self.kernel = _param_from(key, (d_in, d_out), axes, cfg.param_dtype, "normal")
        self.bias = _param(rngs, (d_out,), (axes[1],), cfg.param_dtype, "zeros") if bias else None
        self.dtype = jnp.dtype(cfg.dtype)
        r, adapted = cfg.lora_rank, bool(cfg.lora_rank) and name in cfg.lora_targets
        a_key = jax.random.fold_in(key, 1)
        self.lora_a = _param_from(a_key, (d_in, r), (axes[0], "lora"), "float32", "lora_a") if adapted else None
        self.lora_b = _param_from(key, (r, d_out), ("lora", axes[1]), "float32", "zeros") if adapted else None
        self.lora_scale, self.lora_dropout = cfg.lora_alpha / max(r, 1), cfg.lora_dropout

    def __call__(self, x: Array, dropout_key: Array | None = None) -> Array:
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        y = y if self.bias is None else y + self.bias[...].astype(self.dtype)
        if self.lora_a is None:
            return y
        h = x.astype(jnp.float32)
        if dropout_key is not None and self.lora_dropout > 0:
            keep = 1.0 - self.lora_dropout
            h = jnp.where(jax.random.bernoulli(dropout_key, keep, h.shape), h / keep, 0.0)
        delta = jnp.einsum("...i,ir,ro->...o", h, self.lora_a[...], self.lora_b[...]) * self.lora_scale
        return y + delta.astype(y.dtype)


class RMSNorm(nnx.Module):
    """`w * x / rms(x)`, or `(1 + w) * x / rms(x)` with `cfg.norm_plus_one` (w then starts at 0)."""

    def __init__(self, size: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.scale = _param(rngs, (size,), ("norm",), cfg.param_dtype, "zeros" if cfg.norm_plus_one else "ones")
        self.eps = cfg.rms_norm_eps
        self.plus_one = cfg.norm_plus_one

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if self.plus_one:  # Gemma scales in float32, then rounds
            return (x32 * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_frequencies(cfg: ModelConfig, theta: float | None = None, *, scaled: bool = True) -> Float[Array, "D/2"]:
    """Inverse frequencies `theta^(-2i/D)` (default `cfg.rope_theta`), with Llama-3 or linear
    scaling when configured and `scaled` (Gemma 3 scales its full-attention layers only)."""
    theta = cfg.rope_theta if theta is None else theta
    inv = 1.0 / (theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    s = cfg.rope_scaling
    if not scaled:
        return inv
    inv = inv / cfg.rope_linear_factor
    if s is None:
        return inv
    wavelen = 2 * jnp.pi / inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled_inv = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, (1 - smooth) * scaled_inv / s.factor + smooth * scaled_inv, scaled_inv)


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
        self.q = Dense(d, cfg.num_heads * hd, ("embed", "heads"), cfg, bias=cfg.qkv_bias, rngs=rngs, name="q")
        self.k = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, bias=cfg.qkv_bias, rngs=rngs, name="k")
        self.v = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, bias=cfg.qkv_bias, rngs=rngs, name="v")
        self.o = Dense(cfg.num_heads * hd, d, ("heads", "embed"), cfg, bias=False, rngs=rngs, name="o")
        self.q_norm = RMSNorm(hd, cfg, rngs=rngs) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg, rngs=rngs) if cfg.qk_norm else None
        self.cfg = cfg

    def __call__(
        self,
        x: Array,
        positions: Array,
        inv_freq: Array,
        mask: Mask,
        layer_cache: tuple[Array, Array] | None,
        write_at: Array,
        key: Array | None = None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        cfg = self.cfg
        B, T, _ = x.shape
        K, G, D = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        q, k = self.q(x, _fold(key, 0)).reshape(B, T, K * G, D), self.k(x, _fold(key, 1)).reshape(B, T, K, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        v = self.v(x, _fold(key, 2)).reshape(B, T, K, D)
        if layer_cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(layer_cache[0], k.astype(layer_cache[0].dtype), write_at, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(layer_cache[1], v.astype(layer_cache[1].dtype), write_at, axis=1)
            new_cache = (k, v)
        else:
            new_cache = None
        scale = cfg.query_pre_attn_scalar**-0.5
        kinds = dict(kind=cfg.attention, block=cfg.attention_block, auto_len=cfg.attention_auto_len)
        out = attend(q.reshape(B, T, K, G, D), k, v, mask, scale, sliding_window=cfg.sliding_window, **kinds)
        return self.o(out.reshape(B, T, K * G * D), _fold(key, 3)), new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate = Dense(d, f, ("embed", "mlp"), cfg, bias=False, rngs=rngs, name="gate")
        self.up = Dense(d, f, ("embed", "mlp"), cfg, bias=False, rngs=rngs, name="up")
        self.down = Dense(f, d, ("mlp", "embed"), cfg, bias=False, rngs=rngs, name="down")
        self.activation = cfg.activation

    def __call__(self, x: Array, key: Array | None = None) -> Array:
        gate = ACTIVATIONS[self.activation](self.gate(x, _fold(key, 4)))
        return self.down(gate * self.up(x, _fold(key, 5)), _fold(key, 6))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.attn_norm = RMSNorm(d, cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(d, cfg, rngs=rngs) if cfg.post_norms else None
        self.mlp_norm = RMSNorm(d, cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.post_mlp_norm = RMSNorm(d, cfg, rngs=rngs) if cfg.post_norms else None

    def __call__(self, x, positions, inv_freq, mask, layer_cache, write_at, key=None):
        h, new_cache = self.attn(self.attn_norm(x), positions, inv_freq, mask, layer_cache, write_at, key)
        x = x + (h if self.post_attn_norm is None else self.post_attn_norm(h))
        h = self.mlp(self.mlp_norm(x), key)
        return x + (h if self.post_mlp_norm is None else self.post_mlp_norm(h)), new_cache


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """`cfg.num_layers` blocks as one `Block` whose parameters lead with a `layers` axis.

    The blocks are drawn one after the other from the same `rngs` stream and then stacked, so a
    seed gives the same weights as a list of separate layers would: the stacked (scanned) layout
    is a change of representation, not of the random initialisation."""
    blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
    graphdef, _ = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(b) for b in blocks))
    layers = nnx.merge(graphdef, stacked)
    for _, node in nnx.iter_graph(layers):
        if isinstance(node, nnx.Param):
            node.set_metadata("logical_axes", ("layers", *node.get_metadata()["logical_axes"]))
    return layers


class Transformer(nnx.Module):
    """Decoder-only LM. `__call__` returns final-normed hidden states; `unembedding()` the
    `[d, V]` output matrix, so that log-probs can be computed in vocabulary chunks
    (`ops/logprobs.py`) instead of materialising `[B, T, V]` logits."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype, "normal")
        self.layers = stacked_blocks(cfg, rngs)
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
        dropout_key: Array | None = None,
    ) -> tuple[Float[Array, "B T d"], KVCache | None]:
        """`dropout_key`: draws the LoRA adapters' dropout (training passes only; None = no dropout)."""
        cfg = self.cfg
        T = tokens.shape[1]
        x = jnp.take(self.embed[...], tokens, axis=0)
        if cfg.scale_embeddings:  # in the parameter dtype, as HF does
            x = x * jnp.asarray(cfg.hidden_size**0.5, x.dtype)
        x = shard_rows(x.astype(jnp.dtype(cfg.dtype)))
        if cache is None:
            keys_valid, write_at = valid, jnp.zeros((), jnp.int32)
        else:
            keys_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, cache.end, axis=1)
            write_at = cache.end
        query_slots = write_at + jnp.arange(T)
        no_window = keys_valid.shape[1] + 1  # wider than the cache: full attention
        # Per layer: which window and which rotary frequencies (index 0 full, 1 sliding).
        sliding = jnp.asarray([t == SLIDING for t in cfg.layer_types])
        inv_freqs = jnp.stack(
            [rope_frequencies(cfg), rope_frequencies(cfg, cfg.rope_local_theta or None, scaled=False)]
        )
        graphdef, params = nnx.split(self.layers)

        def layer(x, xs):
            layer_params, is_sliding, layer_cache, key = xs
            block = nnx.merge(graphdef, layer_params)
            mask = Mask(query_slots, keys_valid, jnp.where(is_sliding, cfg.sliding_window, no_window))
            inv_freq = inv_freqs[is_sliding.astype(jnp.int32)]
            x, layer_cache = block(shard_rows(x), positions, inv_freq, mask, layer_cache, write_at, key)
            return shard_rows(x), layer_cache

        step = jax.checkpoint(layer) if cfg.remat else layer
        keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)
        x, new = jax.lax.scan(step, x, (params, sliding, None if cache is None else (cache.k, cache.v), keys))
        hidden = self.final_norm(x)
        if cache is None:
            return hidden, None
        return hidden, KVCache(new[0], new[1], keys_valid, cache.end + T)

    def logits(self, hidden: Float[Array, "B T d"]) -> Float[Array, "B T V"]:
        """Dense float32 logits; for tests and small vocabularies only (see ops/logprobs.py)."""
        return jnp.einsum(
            "btd,dv->btv", hidden, self.unembedding().astype(hidden.dtype), preferred_element_type=jnp.float32
        )


def positions_from_valid(valid: Bool[Array, "B T"]) -> Int[Array, "B T"]:
    """Rotary positions of a left-padded batch: 0, 1, ... over the real tokens (0 on padding)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)
