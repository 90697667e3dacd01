"""Scaled dot-product attention: a dense path and a blockwise (online-softmax, flash-style) one.

Both take grouped queries `q [B, T, K, G, D]` (`G` query heads per key-value head), keys and
values `[B, S, K, D]`, and the mask inputs `Mask(query_slots, keys_valid, window)`: query `t`
sits in slot `query_slots[t]` and may see key slot `s` when `s <= query_slots[t]` (causal),
`keys_valid[b, s]` (left padding, empty cache slots) and `query_slots[t] - s < window` (a
sliding window; pass a window larger than `S` for full attention). A query row with no
allowed key gets the uniform average of all `S` values, in both paths (a finite floor, not
-inf, keeps padded rows finite; their outputs are never read).

`dense_attention` materialises `[B, K, G, T, S]` float32 scores. `blockwise_attention` walks
query blocks of `block_q` and key blocks of `block_k`, keeping a running max and normaliser per
query (float32), so no more than `[B, K, G, block_q, block_k]` scores exist at once; its
backward (a `custom_vjp`) saves only the output and the per-row max and normaliser, and
recomputes each block's probabilities, in two passes (`dq` over key blocks, `dk`/`dv` over
query blocks). Sequence lengths need not be multiples of the blocks: the tail is padded with
keys that take no part in the softmax. Memory is `O(T * H * D)`, not `O(T * S)`.

`choose(kind, T, S, auto_len)` picks the path: "dense", "blockwise", or "auto" = dense when
`T * S <= auto_len**2` (one-token decoding: its scores are `[1, S]` per head), else, for
self-attention without a cache (training and scoring), the backend's fused kernel: Pallas splash
attention on TPU (`splash_attention`: left padding as segment ids, causal or sliding-window
masks, GQA; per device under `shard_map`), cuDNN's on GPU (`fused_attention`, 16-bit inputs:
causal, per-row sequence lengths after rolling each row's left padding to its end, a local
window; no `[T, S]` mask); the blockwise path for long prefills into a cache, on CPU, and where
a kernel cannot take the inputs (float32 on GPU, a mesh that splits neither rows nor heads).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jaxtyping import Array, Bool, Float, Int

KINDS = ("dense", "blockwise", "auto")
MASKED = float(jnp.finfo(jnp.float32).min)  # score of a disallowed key (as the dense path always had)


class Mask(NamedTuple):
    query_slots: Int[Array, "T"]
    keys_valid: Bool[Array, "B S"]
    window: Int[Array, ""]  # keys a query sees, itself included; > S for full attention


# The fused kernel "auto" takes for long self-attention on each backend (the rest: blockwise).
BACKEND_KERNELS = {"tpu": "splash", "gpu": "cudnn"}


def choose(kind: str, queries: int, keys: int, auto_len: int, backend: str | None = None) -> str:
    """The path for `queries` x `keys` scores under the configured `kind`: "dense", "blockwise",
    or (auto only, long self-attention: `queries == keys`, no cache) the backend's fused kernel,
    "splash" on TPU and "cudnn" on GPU. `backend` defaults to `jax.default_backend()`."""
    if kind not in KINDS:
        raise ValueError(f"model.attention={kind!r}: expected one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    if queries * keys <= auto_len * auto_len:
        return "dense"
    backend = backend or jax.default_backend()
    return BACKEND_KERNELS.get(backend, "blockwise") if queries == keys else "blockwise"


def allowed(query_slots: Array, key_slots: Array, keys_valid: Array, window: Array) -> Bool[Array, "B 1 1 T S"]:
    """Which keys each query may see (broadcast over the K and G head axes)."""
    q, k = query_slots[:, None], key_slots[None, :]
    ok = (k <= q) & (q - k < window)  # [T, S]
    return ok[None, None, None] & keys_valid[:, None, None, None, :]


def dense_attention(
    q: Float[Array, "B T K G D"], k: Float[Array, "B S K D"], v: Float[Array, "B S K D"], mask: Mask, scale: float
) -> Float[Array, "B T K G D"]:
    """Attention with the full `[B, K, G, T, S]` float32 score tensor (short sequences)."""
    keep = allowed(mask.query_slots, jnp.arange(k.shape[1]), mask.keys_valid, mask.window)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(keep, scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def attend(
    q: Array,
    k: Array,
    v: Array,
    mask: Mask,
    scale: float,
    *,
    kind: str,
    block: int,
    auto_len: int,
    sliding_window: int = 0,
    backend: str | None = None,
) -> Float[Array, "B T K G D"]:
    """Attention by the path `choose` picks for these shapes. `sliding_window`: the model's window
    (0 = none), the only window other than "none" that `mask.window` may hold (the fused kernels
    take static masks; the layer's flag picks one of two at run time). Splash runs on one device,
    or per device under `shard_map` on the mesh set by `jax.set_mesh` when `_splash_specs` can
    split the rows or the key-value heads over it (`splash_fits`); cuDNN needs 16-bit inputs.
    Where the kernel cannot take the inputs, the blockwise path does, and a warning says why."""
    path = choose(kind, q.shape[1], k.shape[1], auto_len, backend)
    if path == "splash":
        if splash_fits(q.shape[0], k.shape[2]):
            return splash_attention(q, k, v, mask, scale, sliding_window=sliding_window, block=block)
        _fallback(kind, "splash", "the mesh splits neither its rows nor its key-value heads (or no mesh is set)")
    if path == "cudnn":
        if q.dtype in (jnp.bfloat16, jnp.float16):
            return fused_attention(
                q, k, v, mask, scale, implementation="cudnn", sliding_window=sliding_window, block=block
            )
        _fallback(kind, "cudnn", f"cuDNN takes 16-bit inputs, these are {q.dtype}")
    if path == "dense":
        return dense_attention(q, k, v, mask, scale)
    return blockwise_attention(q, k, v, mask, scale, block, block)


def _fallback(kind: str, kernel: str, why: str) -> None:
    """Say (at trace time, once per compilation) that the fused kernel is not taken."""
    logging.warning("model.attention=%r: not the %s kernel: %s; taking the blockwise path", kind, kernel, why)


# ---- blockwise ---------------------------------------------------------------------------------


class _Blocks(NamedTuple):
    """Inputs cut into blocks along a leading axis: queries `[nq, ...]`, keys `[nk, ...]`."""

    q: Array  # [nq, B, bq, K, G, D]
    query_slots: Array  # [nq, bq]
    k: Array  # [nk, B, bk, K, D]
    v: Array  # [nk, B, bk, K, D]
    key_slots: Array  # [nk, bk]
    keys_valid: Array  # [nk, B, bk]
    key_real: Array  # [nk, bk]: False on the padding that rounds S up to whole blocks


def _pad_split(x: Array, axis: int, block: int) -> Array:
    """`x` padded with zeros along `axis` to whole blocks, the block index moved to the front."""
    n = -(-x.shape[axis] // block)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * block - x.shape[axis])
    x = jnp.pad(x, pad)
    x = x.reshape(*x.shape[:axis], n, block, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _blocks(q: Array, k: Array, v: Array, mask: Mask, bq: int, bk: int) -> _Blocks:
    S = k.shape[1]
    slots = jnp.arange(S)
    return _Blocks(
        _pad_split(q, 1, bq),
        _pad_split(mask.query_slots, 0, bq),
        _pad_split(k, 1, bk),
        _pad_split(v, 1, bk),
        _pad_split(slots, 0, bk),
        _pad_split(mask.keys_valid, 1, bk),
        _pad_split(jnp.ones(S, bool), 0, bk),
    )


def _scores(qb, qs, kb, ks, kvalid, kreal, window, scale) -> tuple[Array, Array]:
    """One block's scores `[B, K, G, bq, bk]` (float32, disallowed keys at MASKED, padding keys at
    -inf) and which entries are allowed."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32) * scale
    # Tie the slots to the scores: without this, a scan around the attention (the layer scan) sees
    # the mask as loop-invariant and hoists it for every block pair, a [T, S] array.
    s, qs, ks, kvalid, kreal = jax.lax.optimization_barrier((s, qs, ks, kvalid, kreal))
    keep = allowed(qs, ks, kvalid, window)
    s = jnp.where(keep, s, MASKED)
    return jnp.where(kreal, s, -jnp.inf), keep


def _forward(b: _Blocks, window: Array, scale: float) -> tuple[Array, Array, Array]:
    """Per query block: output `[nq, B, K, G, bq, D]` (float32), row max and normaliser `[nq, B, K, G, bq]`."""
    _, B, bq, K, G, _ = b.q.shape

    def query_block(args):
        qb, qs = args

        def key_block(carry, kv):
            m, norm, acc = carry
            kb, vb, ks, kvalid, kreal = kv
            s, _ = _scores(qb, qs, kb, ks, kvalid, kreal, window, scale)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
            return (m_new, norm * corr + p.sum(-1), acc * corr[..., None] + pv), None

        stats = jnp.full((B, K, G, bq), MASKED, jnp.float32)
        acc = jnp.zeros((B, K, G, bq, b.q.shape[-1]), jnp.float32)
        keys = (b.k, b.v, b.key_slots, b.keys_valid, b.key_real)
        (m, norm, acc), _ = jax.lax.scan(key_block, (stats, jnp.zeros_like(stats), acc), keys)
        return acc / norm[..., None], m, norm

    return jax.lax.map(query_block, (b.q, b.query_slots))


def _unblock_queries(x: Array, T: int) -> Array:
    """`[nq, B, K, G, bq, D]` -> `[B, T, K, G, D]`."""
    nq, B, K, G, bq, D = x.shape
    return jnp.transpose(x, (1, 0, 4, 2, 3, 5)).reshape(B, nq * bq, K, G, D)[:, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blockwise(q, k, v, mask, scale, bq, bk):
    out, _ = _blockwise_fwd(q, k, v, mask, scale, bq, bk)
    return out


def _blockwise_fwd(q, k, v, mask, scale, bq, bk):
    b = _blocks(q, k, v, mask, bq, bk)
    out, m, norm = _forward(b, mask.window, scale)
    out = _unblock_queries(out, q.shape[1]).astype(v.dtype)
    return out, (q, k, v, mask, out, m, norm)


def _blockwise_bwd(scale, bq, bk, res, dout):
    q, k, v, mask, out, m, norm = res
    b = _blocks(q, k, v, mask, bq, bk)
    do = _pad_split(dout.astype(jnp.float32), 1, bq)  # [nq, B, bq, K, G, D]
    delta = jnp.einsum("nbqkgd,nbqkgd->nbkgq", do, _pad_split(out.astype(jnp.float32), 1, bq))
    dq = _dq_pass(b, do, m, norm, delta, mask.window, scale)
    dk, dv = _dkv_pass(b, do, m, norm, delta, mask.window, scale)
    S = k.shape[1]
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :S]  # noqa: E731
    dq = jnp.moveaxis(dq, 0, 1).reshape(q.shape[0], -1, *q.shape[2:])[:, : q.shape[1]]
    return dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), None


def _block_grads(qb, qs, dob, mb, lb, deltab, kb, vb, ks, kvalid, kreal, window, scale):
    """One (query block, key block) pair: probabilities `p` and score gradients `ds`, `[B, K, G, bq, bk]`."""
    s, keep = _scores(qb, qs, kb, ks, kvalid, kreal, window, scale)
    p = jnp.exp(s - mb[..., None]) / lb[..., None]
    dp = jnp.einsum("bqkgd,bskd->bkgqs", dob, vb.astype(jnp.float32))
    ds = jnp.where(keep, p * (dp - deltab[..., None]), 0.0)
    return p, ds


def _dq_pass(b: _Blocks, do, m, norm, delta, window, scale) -> Array:
    """`dq` per query block `[nq, B, bq, K, G, D]` (float32), scanning the key blocks."""

    def query_block(args):
        qb, qs, dob, mb, lb, deltab = args

        def key_block(dq, kv):
            kb, vb, ks, kvalid, kreal = kv
            _, ds = _block_grads(qb, qs, dob, mb, lb, deltab, kb, vb, ks, kvalid, kreal, window, scale)
            return dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, kb.astype(jnp.float32)) * scale, None

        keys = (b.k, b.v, b.key_slots, b.keys_valid, b.key_real)
        dq, _ = jax.lax.scan(key_block, jnp.zeros(qb.shape, jnp.float32), keys)
        return dq

    return jax.lax.map(query_block, (b.q, b.query_slots, do, m, norm, delta))


def _dkv_pass(b: _Blocks, do, m, norm, delta, window, scale) -> tuple[Array, Array]:
    """`dk`, `dv` per key block `[nk, B, bk, K, D]` (float32), scanning the query blocks."""

    def key_block(args):
        kb, vb, ks, kvalid, kreal = args

        def query_block(carry, qargs):
            dk, dv = carry
            qb, qs, dob, mb, lb, deltab = qargs
            p, ds = _block_grads(qb, qs, dob, mb, lb, deltab, kb, vb, ks, kvalid, kreal, window, scale)
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p, dob)
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qb.astype(jnp.float32)) * scale
            return (dk, dv), None

        zeros = jnp.zeros(kb.shape, jnp.float32)
        (dk, dv), _ = jax.lax.scan(query_block, (zeros, zeros), (b.q, b.query_slots, do, m, norm, delta))
        return dk, dv

    return jax.lax.map(key_block, (b.k, b.v, b.key_slots, b.keys_valid, b.key_real))


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(
    q: Float[Array, "B T K G D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K D"],
    mask: Mask,
    scale: float,
    block_q: int = 512,
    block_k: int = 512,
) -> Float[Array, "B T K G D"]:
    """Attention in `block_q` x `block_k` tiles with an online softmax (float32 statistics and
    accumulator) and a recomputing backward; equal to `dense_attention` up to rounding."""
    bq, bk = max(1, min(block_q, q.shape[1])), max(1, min(block_k, k.shape[1]))
    return _blockwise(q, k, v, mask, float(scale), bq, bk)


# ---- fused kernels -------------------------------------------------------------------------------


def fused_attention(
    q: Float[Array, "B T K G D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K D"],
    mask: Mask,
    scale: float,
    *,
    implementation: str,
    sliding_window: int = 0,
    block: int = 512,
) -> Float[Array, "B T K G D"]:
    """Self-attention (query slot t = key slot t, no cache) by `jax.nn.dot_product_attention`
    ("cudnn" on GPU; "xla" elsewhere, for tests) with no `[T, S]` mask: `is_causal`, per-row
    sequence lengths and, for sliding-window layers, `local_window_size`.

    Those lengths count from slot 0 (right padding), ours are left-padded, so each row is rolled
    left by its first valid slot (its tokens then start at slot 0, its padding follows them) and
    the output rolled back; causal order and the window are unchanged by a shift. Exact when each
    row's valid keys are one span (left padding, tokens, right padding: how the model's batches
    are laid out), the query slots are `0..T-1` and `mask.window` is wider than `T` or equal to
    `sliding_window`; otherwise (checked at run time) the blockwise path computes the output.
    Padded query rows come out as 0, not the dense path's average; they are never read."""
    B, T, K, G, D = q.shape
    index, first, length = fused_plan(mask, T, sliding_window)
    lengths = jnp.maximum(length, 1)  # an empty row attends to its first slot: finite, never read
    gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(B, T, *([1] * (x.ndim - 2))), axis=1)  # noqa: E731
    rolled = (jnp.arange(T)[None, :] + first[:, None]) % T  # rolled slot -> slot

    def fused(local_window):
        def run(q, k, v):
            qr, kr, vr = gather(q, rolled).reshape(B, T, K * G, D), gather(k, rolled), gather(v, rolled)
            seqs = dict(query_seq_lengths=lengths, key_value_seq_lengths=lengths, local_window_size=local_window)
            out = jax.nn.dot_product_attention(
                qr, kr, vr, scale=scale, is_causal=True, implementation=implementation, **seqs
            )
            return gather(out.reshape(B, T, K, G, D), (jnp.arange(T)[None, :] - first[:, None]) % T)

        return run

    branches = [lambda q, k, v: blockwise_attention(q, k, v, mask, scale, block, block), fused(None)]
    if sliding_window:
        branches.append(fused((sliding_window - 1, 0)))  # keys (t - sliding_window, t]
    return jax.lax.switch(index, branches, q, k, v)


def fused_plan(mask: Mask, T: int, sliding_window: int) -> tuple[Array, Array, Array]:
    """`fused_attention`'s branch (0 blockwise, 1 causal, 2 causal within `sliding_window`), and
    each row's first valid slot and count of valid slots `[B]`. The fused branches are taken only
    where they are exact: every row's valid slots one span, query slots `0..T-1`, and the window
    wider than `T` (1) or equal to `sliding_window` (2)."""
    valid, slots = mask.keys_valid, jnp.arange(T)
    first = jnp.argmax(valid, axis=1).astype(jnp.int32)
    length = valid.sum(axis=1, dtype=jnp.int32)
    span = (slots >= first[:, None]) & (slots < (first + length)[:, None])
    exact = jnp.all(valid == span) & jnp.all(mask.query_slots == slots)
    index = jnp.where(exact & (mask.window >= T), 1, 0)
    if sliding_window:
        index = jnp.where(exact & (mask.window < T) & (mask.window == sliding_window), 2, index)
    return index, first, length


def _splash_kernel(heads: int, length: int, window: int, block: int, interpret: bool):
    """A splash-attention kernel for `heads` heads over `length` slots: causal, and within
    `window` keys when `window > 0` (query `t` sees keys `(t - window, t]`)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    shape = (length, length)
    one = sm.LocalMask(shape, (window - 1, 0), 0) if window else sm.CausalMask(shape)
    sizes = dict(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block)
    sizes |= dict(block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    blocks = sk.BlockSizes(**sizes)
    mha = sm.MultiHeadMask([one] * heads)
    kernel = sk.make_splash_mha(mha, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    return kernel, sk.SegmentIds


def _splash_shard(q, k, v, segments, window, scale, sliding_window, block, interpret):
    """Splash attention on one device's rows: `q [B, T, K, G, D]`, segments `[B, T]`."""
    B, T, K, G, D = q.shape
    causal, SegmentIds = _splash_kernel(K * G, T, 0, block, interpret)

    def run(kernel):
        def one(qb, kb, vb, sb):
            heads = lambda x: jnp.transpose(x.reshape(T, -1, D), (1, 0, 2))  # noqa: E731
            return kernel(heads(qb * scale), heads(kb), heads(vb), segment_ids=SegmentIds(sb, sb))

        return lambda: jax.vmap(one)(q, k, v, segments)

    if not sliding_window:
        out = run(causal)()
    else:
        local, _ = _splash_kernel(K * G, T, sliding_window, block, interpret)
        out = jax.lax.cond(window <= sliding_window, run(local), run(causal))
    return jnp.transpose(out, (0, 2, 1, 3)).reshape(B, T, K, G, D).astype(v.dtype)


def splash_attention(
    q: Float[Array, "B T K G D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K D"],
    mask: Mask,
    scale: float,
    *,
    sliding_window: int = 0,
    block: int = 512,
    interpret: bool = False,
) -> Float[Array, "B T K G D"]:
    """Self-attention (query slot t = key slot t, no cache) with the Pallas TPU splash kernel.

    Left padding becomes segment ids (real tokens 1, padding 0): a real query sees only real
    keys, as in `dense_attention`; padded query rows see padded keys and hold other (finite)
    values than the dense path's, never read. `mask.window` is either `sliding_window` or
    wider than the sequence. The length is padded to whole blocks of a multiple of 128. Under
    `jax.set_mesh` the kernel runs per device (`shard_map`) over the rows split on the batch
    axes and the key-value heads split on `tensor` where they divide. `interpret=True` runs the
    kernel in the Pallas interpreter (CPU tests)."""
    B, T = q.shape[:2]
    block = max(128, min(block, -(-T // 128) * 128) // 128 * 128)
    length = -(-T // block) * block
    pad = lambda x: jnp.pad(x, [(0, 0), (0, length - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    segments = pad(mask.keys_valid.astype(jnp.int32))
    args = (pad(q), pad(k), pad(v), segments, mask.window)
    fn = functools.partial(_splash_shard, scale=scale, sliding_window=sliding_window, block=block, interpret=interpret)
    specs = _splash_specs(B, k.shape[2])
    if specs is not None:
        fn = jax.shard_map(fn, in_specs=specs, out_specs=specs[0], check_vma=False)
    elif jax.sharding.get_abstract_mesh().size > 1:
        raise ValueError(
            f"splash_attention: the mesh {dict(jax.sharding.get_abstract_mesh().shape)} splits neither the "
            f"{B} rows (data, fsdp) nor the {k.shape[2]} key-value heads (tensor); the Pallas kernel would "
            "run on the global arrays. Use blockwise_attention (attend does)."
        )
    return fn(*args)[:, :T]


def splash_fits(rows: int, kv_heads: int) -> bool:
    """Whether the splash kernel can run here: on one device (no mesh and one device, or a
    one-device mesh), or per device on the mesh set by `jax.set_mesh` where `_splash_specs`
    splits the rows over its batch axes or the key-value heads over `tensor`. Not otherwise: a
    Pallas kernel is not partitioned by XLA, so it would run on the global arrays."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return jax.device_count() == 1
    return mesh.size == 1 or _splash_specs(rows, kv_heads) is not None


def _splash_specs(rows: int, kv_heads: int) -> tuple | None:
    """shard_map specs of (q, k, v, segments, window) on the mesh set by `jax.set_mesh`, or None."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    batch = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
    width = int(np.prod([mesh.shape[a] for a in batch])) if batch else 1
    rows_axes = batch if batch and rows % width == 0 else None
    tensor = "tensor" if mesh.shape.get("tensor", 1) > 1 and kv_heads % mesh.shape["tensor"] == 0 else None
    if rows_axes is None and tensor is None:
        return None
    return (
        P(rows_axes, None, tensor, None, None),
        P(rows_axes, None, tensor, None),
        P(rows_axes, None, tensor, None),
        P(rows_axes, None),
        P(),
    )
