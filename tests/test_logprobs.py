"""The vocabulary-chunked log-prob/entropy op against the dense computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gtpo_jax.ops.logprobs import dense_logprobs_and_entropy, token_logprobs_and_entropy

# Chunks that divide nothing (37 tokens, 101 words), one chunk, and chunks larger than the data.
CHUNKS = [(8, 32), (37, 101), (64, 4096)]


def _problem(seed=0, N=37, d=16, V=101, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(k[0], (N, d), dtype)
    w = (jax.random.normal(k[1], (d, V)) * 0.5).astype(dtype)
    y = jax.random.randint(k[2], (N,), 0, V)
    return h, w, y, jax.random.normal(k[3], (N,)), jax.random.normal(k[4], (N,))


@pytest.mark.parametrize("temperature", [0.6, 1.0])
@pytest.mark.parametrize(("token_chunk", "vocab_chunk"), CHUNKS)
def test_values_and_gradients_equal_the_dense_computation(temperature, token_chunk, vocab_chunk):
    h, w, y, g_logp, g_ent = _problem()
    chunked = lambda h, w: token_logprobs_and_entropy(  # noqa: E731
        h, w, y, temperature=temperature, token_chunk=token_chunk, vocab_chunk=vocab_chunk
    )
    dense = lambda h, w: dense_logprobs_and_entropy(h, w, y, temperature=temperature)  # noqa: E731
    for a, b in zip(chunked(h, w), dense(h, w), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

    def weighted(fn):  # a loss that uses both outputs, so both cotangents are exercised
        return lambda h, w: jnp.sum(fn(h, w)[0] * g_logp) + jnp.sum(fn(h, w)[1] * g_ent)

    grads = jax.grad(weighted(chunked), argnums=(0, 1))(h, w)
    expected = jax.grad(weighted(dense), argnums=(0, 1))(h, w)
    for a, b in zip(grads, expected, strict=True):
        scale = float(jnp.abs(b).max())
        assert scale > 1.0
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-5)


def test_gradients_exact_in_float64():
    with jax.enable_x64(True):
        h, w, y, g_logp, g_ent = _problem(seed=1, dtype=jnp.float64)

        def loss(fn):
            return lambda h, w: jnp.sum(fn(h, w)[0] * g_logp) + jnp.sum(fn(h, w)[1] * g_ent)

        chunked = loss(lambda h, w: token_logprobs_and_entropy(h, w, y, temperature=0.6, token_chunk=8, vocab_chunk=32))
        dense = loss(lambda h, w: dense_logprobs_and_entropy(h, w, y, temperature=0.6))
        for a, b in zip(jax.grad(chunked, (0, 1))(h, w), jax.grad(dense, (0, 1))(h, w), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_bfloat16_inputs_give_float32_outputs_and_batch_shapes_are_kept():
    h, w, y, _, _ = _problem(N=24, dtype=jnp.bfloat16)
    logp, ent = token_logprobs_and_entropy(h.reshape(2, 3, 4, 16), w, y.reshape(2, 3, 4), token_chunk=5, vocab_chunk=40)
    assert logp.shape == ent.shape == (2, 3, 4) and logp.dtype == ent.dtype == jnp.float32
    ref_logp, ref_ent = dense_logprobs_and_entropy(h.astype(jnp.float32), w.astype(jnp.float32), y)
    np.testing.assert_allclose(logp.reshape(-1), ref_logp, atol=1e-4)
    np.testing.assert_allclose(ent.reshape(-1), ref_ent, atol=1e-4)
    assert np.all(np.asarray(ent) >= 0) and np.all(np.asarray(ent) <= np.log(101) + 1e-5)


def test_bad_arguments():
    h, w, y, _, _ = _problem()
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="token_chunk"):
        token_logprobs_and_entropy(h, w, y, token_chunk=0)


@pytest.mark.parametrize("scale", [30.0, 50.0])
@pytest.mark.parametrize(("token_chunk", "vocab_chunk"), CHUNKS[:2])
def test_entropy_keeps_float64_accuracy_at_large_logit_scales(scale, token_chunk, vocab_chunk):
    # One-hot hidden states make the logits exactly the float32 rows of `w` (a one-hot dot
    # product rounds nothing), so the only error left is the entropy's own accumulation. The
    # logits mix a few large values with a spread-out tail, as a confident LM's do.
    N, V = 37, 101
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(N, V)) * scale / 3).astype(np.float32)
    logits[np.arange(N), rng.integers(0, V, N)] += scale
    h = jnp.eye(N, dtype=jnp.float32)
    y = jnp.asarray(rng.integers(0, V, N))
    _, ent = token_logprobs_and_entropy(h, jnp.asarray(logits), y, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    z = logits.astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -(np.exp(logp) * logp).sum(-1)
    assert expected.max() > 0.1  # not a degenerate one-hot distribution
    np.testing.assert_allclose(np.asarray(ent, np.float64), expected, atol=1e-6, rtol=0)
