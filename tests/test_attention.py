"""Blockwise (online-softmax) attention equals dense attention: values and gradients, with left
padding, GQA, causal and sliding-window masks, lengths that are not multiples of the blocks, a
KV cache; in the whole model too; and it holds far less temporary memory."""

import re

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gtpo_jax.models.attention import Mask, blockwise_attention, choose, dense_attention
from gtpo_jax.models.presets import get_preset
from gtpo_jax.models.transformer import KVCache, Transformer, positions_from_valid

B, K, G, D = 2, 2, 2, 8  # 4 query heads sharing 2 key-value heads


def _inputs(T, S, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, K, G, D))
    k, v = jax.random.normal(ks[1], (B, S, K, D)), jax.random.normal(ks[2], (B, S, K, D))
    return q, k, v, jax.random.normal(ks[3], (B, T, K, G, D))


# (T queries, S keys, first query slot, block_q, block_k, window): self-attention and a chunk of
# queries written into a longer cache (slots past the queries are empty), full and sliding.
CASES = [
    (13, 13, 0, 4, 5, 100),
    (13, 13, 0, 3, 7, 4),
    (13, 13, 0, 64, 64, 100),  # one block, clamped to the lengths
    (5, 19, 6, 2, 4, 100),
    (5, 19, 6, 4, 3, 3),
    (1, 19, 10, 1, 4, 100),  # one decoding step reads the cache in blocks
]


@pytest.mark.parametrize("T,S,start,bq,bk,window", CASES)
def test_blockwise_equals_dense_values_and_gradients(T, S, start, bq, bk, window):
    q, k, v, dout = _inputs(T, S)
    # Row 0 unpadded, row 1 left-padded by 4 slots; slots after the queries hold no token yet.
    slots = jnp.arange(S)
    valid = (slots[None, :] >= jnp.array([[0], [4]])) & (slots[None, :] < start + T)
    mask = Mask(start + jnp.arange(T), valid, jnp.int32(window))
    dense = lambda q, k, v: dense_attention(q, k, v, mask, 0.3)  # noqa: E731
    block = lambda q, k, v: blockwise_attention(q, k, v, mask, 0.3, bq, bk)  # noqa: E731
    loss = lambda f: lambda *qkv: jnp.sum(f(*qkv) * dout)  # noqa: E731
    run = lambda f: jax.jit(lambda *qkv: (f(*qkv), jax.grad(loss(f), argnums=(0, 1, 2))(*qkv)))(q, k, v)  # noqa: E731
    (value, got), (want_value, want) = run(block), run(dense)
    np.testing.assert_allclose(value, want_value, atol=1e-5, rtol=1e-5)
    for name, g, w in zip("qkv", got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_blockwise_under_jit_in_bfloat16_stays_close_to_float32():
    q, k, v, _ = _inputs(11, 11)
    mask = Mask(jnp.arange(11), jnp.ones((B, 11), bool), jnp.int32(100))
    want = dense_attention(q, k, v, mask, 0.3)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, mask, 0.3, 4, 4))(*bf)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=5e-2)


def test_auto_picks_blockwise_for_long_sequences_only():
    assert choose("auto", 4096, 4096, 2048) == "blockwise"
    assert choose("auto", 1, 8192, 2048) == "dense"  # a decoding step: [1, S] scores
    assert choose("auto", 64, 64, 2048) == "dense"
    assert choose("dense", 8192, 8192, 1) == "dense" and choose("blockwise", 2, 2, 2048) == "blockwise"
    with pytest.raises(ValueError, match="model.attention"):
        get_preset("tiny", attention="flash")


def _padded_batch(T=10):
    valid = np.ones((2, T), bool)
    valid[1, :3] = False  # row 1 left-padded by 3
    tokens = np.where(valid, np.random.default_rng(0).integers(1, 20, (2, T)), 0)
    return jnp.asarray(tokens), positions_from_valid(jnp.asarray(valid)), jnp.asarray(valid)


def _models(preset, **block_fields):
    dense = Transformer(get_preset(preset, attention="dense"), rngs=nnx.Rngs(0))
    cfg = get_preset(preset, attention="blockwise", attention_block=4, **block_fields)
    return dense, Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("preset", ["tiny", "tiny_qwen2", "tiny_gemma3"])
def test_model_logits_and_parameter_gradients_match_dense(preset):
    dense, block = _models(preset, remat=True)  # the custom VJP under the layer's rematerialisation
    tokens, positions, valid = _padded_batch()

    def loss(model):
        hidden, _ = model(tokens, positions, valid)
        logits = model.logits(hidden)
        return jnp.sum(jnp.where(valid[..., None], jax.nn.log_softmax(logits), 0.0)[..., 1]), logits

    grad = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    (_, want), g_want = grad(dense)
    (_, got), g_got = grad(block)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    flat_want, flat_got = jax.tree.leaves(nnx.state(g_want)), jax.tree.leaves(nnx.state(g_got))
    for g, w in zip(flat_got, flat_want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("preset", ["tiny_qwen2", "tiny_gemma3"])
def test_prefill_and_decode_through_the_cache_match_dense(preset):
    dense, block = _models(preset)
    tokens, positions, valid = _padded_batch()
    want, _ = dense(tokens, positions, valid)
    cache = KVCache.empty(block.cfg, tokens.shape[0], 16)
    pieces = []
    for lo, hi in ((0, 7), (7, 8), (8, 10)):  # a prefill of 7 (not a multiple of 4), one token, two
        h, cache = block(tokens[:, lo:hi], positions[:, lo:hi], valid[:, lo:hi], cache)
        pieces.append(h)
    got = jnp.concatenate(pieces, axis=1)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5, rtol=1e-5)


def test_sharded_blockwise_forward_equals_dense():
    from gtpo_jax.models.sharding import create_sharded, make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    dense, _ = _models("tiny_qwen2")
    cfg = get_preset("tiny_qwen2", attention="blockwise", attention_block=4)
    sharded = create_sharded(cfg, mesh, seed=0)  # the weights of Transformer(cfg, rngs=nnx.Rngs(0)), on the mesh
    assert len(sharded.layers.attn.q.kernel[...].sharding.device_set) == 8
    tokens, positions, valid = (jnp.concatenate([x] * 2) for x in _padded_batch())  # batch 4
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    forward = nnx.jit(lambda m, t, p, v: m(t, p, v)[0])
    got = forward(sharded, *(jax.device_put(x, batch) for x in (tokens, positions, valid)))
    want, _ = dense(tokens, positions, valid)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5, rtol=1e-5)


def _temp_bytes(attention, S, H=4, KV=2, Dh=64):
    q = jax.ShapeDtypeStruct((1, S, KV, H // KV, Dh), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, S, KV, Dh), jnp.float32)
    mask = Mask(jnp.arange(S), jnp.ones((1, S), bool), jnp.int32(S + 1))
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, mask, 0.125))  # noqa: E731
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_temporary_memory_is_a_fraction_of_dense():
    S = 2048
    dense = _temp_bytes(dense_attention, S)
    block = _temp_bytes(lambda *a: blockwise_attention(*a, 256, 256), S)
    assert block * 8 <= dense, (block, dense)


def test_auto_takes_the_backends_fused_kernel_for_long_self_attention_only():
    from gtpo_jax.models import attention

    assert choose("auto", 4096, 4096, 2048, backend="tpu") == "splash"
    assert choose("auto", 4096, 4096, 2048, backend="gpu") == "cudnn"
    assert choose("auto", 4096, 4096, 2048, backend="cpu") == "blockwise"
    assert choose("auto", 2048, 8192, 1024, backend="tpu") == "blockwise"  # a prefill into a cache
    assert choose("auto", 1, 8192, 2048, backend="tpu") == "dense"  # a decoding step
    assert choose("blockwise", 4096, 4096, 2048, backend="tpu") == "blockwise"  # an explicit kind stays
    assert choose("auto", 4096, 4096, 2048) == "blockwise"  # this machine's backend: CPU
    q, k, v, _ = _inputs(9, 9)
    mask = Mask(jnp.arange(9), jnp.ones((B, 9), bool), jnp.int32(100))
    calls = []

    def fake_splash(q, k, v, mask, scale, *, sliding_window, block):
        calls.append((q.shape, sliding_window, block))
        return q

    kw = dict(kind="auto", block=4, auto_len=2)
    orig, attention.splash_attention = attention.splash_attention, fake_splash
    try:
        with jax.set_mesh(jax.make_mesh((1,), ("fsdp",), devices=jax.devices()[:1])):
            attention.attend(q, k, v, mask, 0.3, sliding_window=5, backend="tpu", **kw)
        unsplit = attention.attend(q, k, v, mask, 0.3, sliding_window=5, backend="tpu", **kw)
    finally:
        attention.splash_attention = orig
    assert calls == [((B, 9, K, G, D), 5, 4)]
    # Several devices and no mesh set: a Pallas kernel would be replicated, so blockwise.
    assert jax.device_count() > 1
    np.testing.assert_array_equal(unsplit, blockwise_attention(q, k, v, mask, 0.3, 4, 4))
    # cuDNN takes 16-bit inputs only: float32 on a GPU goes blockwise.
    got = attention.attend(q, k, v, mask, 0.3, backend="gpu", **kw)
    np.testing.assert_array_equal(got, blockwise_attention(q, k, v, mask, 0.3, 4, 4))


def _splash_case(T, window, sliding, left_pad=37, seed=0):
    q, k, v, dout = _inputs(T, T, seed)
    valid = jnp.arange(T)[None, :] >= jnp.array([[0], [left_pad]])
    return (q, k, v, dout), valid, Mask(jnp.arange(T), valid, jnp.int32(window))


@pytest.mark.parametrize("T,window,sliding", [(200, 10**6, 0), (200, 40, 40), (256, 10**6, 40)])
def test_splash_kernel_in_interpret_mode_equals_dense_on_real_rows(T, window, sliding):
    """Causal, sliding window (the layer's flag picks it), GQA, left padding, a length that is
    not a multiple of the 128-slot blocks; values and gradients."""
    from gtpo_jax.models.attention import splash_attention

    (q, k, v, dout), valid, mask = _splash_case(T, window, sliding)
    real = valid[:, :, None, None, None]
    splash = lambda q, k, v: splash_attention(q, k, v, mask, 0.3, sliding_window=sliding, interpret=True)  # noqa: E731
    dense = lambda q, k, v: dense_attention(q, k, v, mask, 0.3)  # noqa: E731
    loss = lambda f: lambda *qkv: jnp.sum(jnp.where(real, f(*qkv), 0.0) * dout)  # noqa: E731
    run = lambda f: jax.jit(lambda *qkv: (f(*qkv), jax.grad(loss(f), argnums=(0, 1, 2))(*qkv)))(q, k, v)  # noqa: E731
    (value, got), (want_value, want) = run(splash), run(dense)
    np.testing.assert_allclose(np.asarray(value)[valid], np.asarray(want_value)[valid], atol=1e-5, rtol=1e-5)
    for name, g, w in zip("qkv", got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def _spy_on_dot_product_attention(monkeypatch, T):
    """Record the keyword arguments of each `jax.nn.dot_product_attention` call and run it with
    XLA's implementation (cuDNN needs a GPU); fail on a mask, a bias or any `[T, T]` array."""
    real, calls = jax.nn.dot_product_attention, []

    def spy(query, key, value, bias=None, mask=None, **kw):
        assert mask is None and bias is None, "a dense [T, S] mask or bias reached the fused kernel"
        for x in (query, key, value, *kw.values()):
            assert not (hasattr(x, "shape") and x.shape[-2:] == (T, T)), ("a [T, S] array", x.shape)
        calls.append({name: kw[name] for name in ("is_causal", "local_window_size", "implementation")})
        up = (x.astype(jnp.float32) for x in (query, key, value))  # XLA on CPU: no float16 dots
        return real(*up, **(kw | {"implementation": "xla"})).astype(query.dtype)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    return calls


def _padded_spans(T):
    """Row 0 unpadded, row 1 left-padded by 9, row 2 left-padded by 4 and right-padded by 11 (a
    prompt and a short response), row 3 all padding."""
    slots = jnp.arange(T)[None, :]
    return (slots >= jnp.array([[0], [9], [4], [T]])) & (slots < jnp.array([[T], [T], [T - 11], [T]]))


# (window, model's sliding_window, the branch `fused_plan` must take: 1 causal, 2 sliding)
FUSED_CASES = [(10**6, 0, 1), (7, 7, 2), (10**6, 7, 1)]


@pytest.mark.parametrize("window,sliding,branch", FUSED_CASES)
def test_gpu_dispatch_passes_no_mask_and_equals_dense_with_left_padding(monkeypatch, window, sliding, branch):
    """The GPU path (`attend` on backend "gpu", 16-bit inputs): causal + sequence lengths +
    local window, values and gradients equal to dense attention on the real rows, GQA."""
    from gtpo_jax.models.attention import attend, fused_plan

    T = 50
    calls = _spy_on_dot_product_attention(monkeypatch, T)
    q, k, v, dout = (x.astype(jnp.float16) for x in _inputs(T, T))
    q, k, v, dout = (jnp.concatenate([x] * 2) for x in (q, k, v, dout))  # 4 rows
    valid = _padded_spans(T)
    mask = Mask(jnp.arange(T), valid, jnp.int32(window))
    real = valid[:, :, None, None, None]

    def fused(*qkv):
        return attend(*qkv, mask, 0.3, kind="auto", block=16, auto_len=8, sliding_window=sliding, backend="gpu")

    dense = lambda *qkv: dense_attention(*(x.astype(jnp.float32) for x in qkv), mask, 0.3)  # noqa: E731
    loss = lambda f: lambda *qkv: jnp.sum(jnp.where(real, f(*qkv), 0.0).astype(jnp.float32) * dout)  # noqa: E731
    run = lambda f: jax.jit(lambda *qkv: (f(*qkv), jax.grad(loss(f), argnums=(0, 1, 2))(*qkv)))(q, k, v)  # noqa: E731
    (value, got), (want_value, want) = run(fused), run(dense)
    assert calls and all(c["is_causal"] and c["implementation"] == "cudnn" for c in calls)
    assert {c["local_window_size"] for c in calls} == ({None, (sliding - 1, 0)} if sliding else {None})
    assert int(fused_plan(mask, T, sliding)[0]) == branch  # the kernel, not the blockwise fallback
    np.testing.assert_allclose(
        np.asarray(value, np.float32)[valid], np.asarray(want_value, np.float32)[valid], atol=2e-3, rtol=2e-3
    )
    for name, g, w in zip("qkv", got, want, strict=True):
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), atol=1e-2, rtol=1e-2, err_msg=f"d{name}"
        )


def test_fused_attention_equals_dense_in_float32_and_takes_blockwise_when_not_exact(monkeypatch):
    """To 1e-5 in float32 (XLA's implementation); a row whose valid slots are not one span, or
    query slots that are not 0..T-1, take the blockwise path at run time (the roll would be wrong)."""
    from gtpo_jax.models.attention import fused_attention, fused_plan

    T = 40
    _spy_on_dot_product_attention(monkeypatch, T)
    q, k, v, _ = (jnp.concatenate([x] * 2) for x in _inputs(T, T))
    spans = _padded_spans(T)
    holes = spans.at[0, 20:23].set(False)  # row 0: a hole in the middle
    arange = jnp.arange(T)
    cases = [(spans, arange, 7, 2), (spans, arange, 10**6, 1), (holes, arange, 7, 0), (spans, 3 + arange, 7, 0)]
    for valid, slots, window, branch in cases:
        mask = Mask(slots, valid, jnp.int32(window))
        assert int(fused_plan(mask, T, 7)[0]) == branch
        fused = lambda q, k, v, m: fused_attention(q, k, v, m, 0.3, implementation="xla", sliding_window=7, block=16)  # noqa: E731
        got = jax.jit(fused)(q, k, v, mask)
        want = dense_attention(q, k, v, mask, 0.3)
        rows = valid & (slots < T)[None, :]
        np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=1e-5, rtol=1e-5)


def test_splash_dispatch_on_a_four_device_mesh():
    """Splash only where it runs per device: rows split over fsdp, or heads over tensor; a mesh
    that splits neither (2 rows on 4 fsdp devices, 2 KV heads, no tensor axis) takes the blockwise
    path, and `splash_attention` itself refuses it rather than run on the global arrays."""
    from gtpo_jax.models import attention
    from gtpo_jax.models.attention import splash_attention, splash_fits
    from gtpo_jax.models.sharding import make_mesh

    four = jax.devices()[:4]
    assert splash_fits(2, 2) is False  # 8 devices, no mesh set
    with jax.set_mesh(make_mesh(data=1, fsdp=4, tensor=1, devices=four)):
        assert splash_fits(4, 2) and splash_fits(8, 2) and not splash_fits(2, 2) and not splash_fits(6, 2)
    with jax.set_mesh(make_mesh(data=1, fsdp=2, tensor=2, devices=four)):
        assert splash_fits(3, 2) and splash_fits(2, 1) and not splash_fits(3, 1)
    with jax.set_mesh(make_mesh(data=1, fsdp=1, tensor=1, devices=four[:1])):
        assert splash_fits(3, 1)  # one device: the kernel on the whole arrays is its own shard

    q, k, v, _ = _inputs(9, 9)  # B = 2 rows, 2 KV heads
    mask = Mask(jnp.arange(9), jnp.ones((B, 9), bool), jnp.int32(100))
    calls = []
    fake = lambda q, *a, **kw: calls.append(q.shape) or q  # noqa: E731
    kw = dict(kind="auto", block=4, auto_len=2, backend="tpu")
    orig, attention.splash_attention = attention.splash_attention, fake
    try:
        with jax.set_mesh(make_mesh(data=1, fsdp=4, tensor=1, devices=four)):
            got = attention.attend(q, k, v, mask, 0.3, **kw)
            assert calls == []
            wide = [jnp.concatenate([x] * 2) for x in (q, k, v)]
            attention.attend(*wide, Mask(mask.query_slots, jnp.ones((4, 9), bool), mask.window), 0.3, **kw)
            assert calls == [(4, 9, K, G, D)]
    finally:
        attention.splash_attention = orig
    np.testing.assert_array_equal(got, blockwise_attention(q, k, v, mask, 0.3, 4, 4))
    with jax.set_mesh(make_mesh(data=1, fsdp=4, tensor=1, devices=four)):
        with pytest.raises(ValueError, match="splits neither"):
            splash_attention(q, k, v, mask, 0.3, interpret=True)


def test_splash_under_a_mesh_runs_per_device_and_equals_dense():
    from gtpo_jax.models.attention import splash_attention
    from gtpo_jax.models.sharding import make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    q, k, v, _ = (jnp.concatenate([x] * 2) for x in _inputs(130, 130))  # 4 rows, 2 KV heads
    valid = jnp.arange(130)[None, :] >= jnp.array([[0], [5], [60], [0]])
    mask = Mask(jnp.arange(130), valid, jnp.int32(1000))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v: splash_attention(q, k, v, mask, 0.3, interpret=True))(q, k, v)
    want = dense_attention(q, k, v, mask, 0.3)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5, rtol=1e-5)


def test_under_a_mesh_each_device_computes_only_its_rows():
    """`shard_rows`: with the weights split over fsdp and no mesh set, XLA computed the whole
    batch on every device (the memory plan's finding); under `jax.set_mesh` each device holds
    its eighth of the activations."""
    from gtpo_jax.models.sharding import ModelDef, create_sharded, make_mesh

    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    cfg = get_preset("tiny_qwen2")
    model_def, params = ModelDef.of(cfg), nnx.to_pure_dict(nnx.state(create_sharded(cfg, mesh)))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    tokens = jax.device_put(jnp.ones((8, 256), jnp.int32), rows)
    valid = jax.device_put(jnp.ones((8, 256), bool), rows)

    def mlp_rows():
        """Rows of the MLP's `[rows, intermediate]` activations in the per-device program."""
        forward = jax.jit(lambda p, t, v: model_def.merge(p)(t, positions_from_valid(v), v)[0])
        hlo = forward.lower(params, tokens, valid).compile().as_text()
        return {int(n) for n in re.findall(rf"\[(\d+),{cfg.intermediate_size}\]", hlo)}

    assert max(mlp_rows()) == 8 * 256  # every device: the whole batch
    with jax.set_mesh(mesh):
        assert max(mlp_rows()) == 256  # its own row
