"""The transformer against Hugging Face `transformers`, export round trips, cache, remat, sharding."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import hf_logits, padded_batch, save_tiny

from gtpo_jax.models.presets import get_preset
from gtpo_jax.models.safetensors_io import CheckpointReader
from gtpo_jax.models.sharding import create_sharded, make_mesh, param_shardings
from gtpo_jax.models.transformer import KVCache, ModelConfig, Transformer
from gtpo_jax.models.weights import config_from_hf, export_hf, load_hf

pytest.importorskip("transformers")


def our_logits(model, tokens, valid, positions):
    hidden, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid))
    return np.asarray(model.logits(hidden))


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2", "qwen3", "gemma3"])
def test_logits_match_transformers_on_a_padded_batch(kind, tmp_path):
    reference = save_tiny(kind, str(tmp_path))
    model = load_hf(tmp_path)
    assert model.cfg.architecture == ("llama" if kind == "llama3" else kind)
    tokens, valid, positions = padded_batch()
    ours = our_logits(model, tokens, valid, positions)
    theirs = hf_logits(reference, tokens, valid, positions)
    assert np.abs(theirs[valid]).max() > 0.1
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4, rtol=0)
    if kind == "gemma3":  # the window of 4 matters on this batch: ignoring it changes the logits
        wide = our_logits(load_hf(tmp_path, sliding_window=64), tokens, valid, positions)
        assert np.abs(wide[valid] - theirs[valid]).max() > 1e-3


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "qwen3", "gemma3"])
def test_export_then_reload_gives_identical_parameters_and_transformers_reads_it(kind, tmp_path):
    import transformers

    save_tiny(kind, str(tmp_path / "hf"))
    model = load_hf(tmp_path / "hf")
    files = export_hf(model, tmp_path / "out", max_shard_bytes=40_000)  # force several shards + index
    assert "model.safetensors.index.json" in files and len(files) > 3
    again = load_hf(tmp_path / "out")
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Byte-identical tensors to the original checkpoint, and transformers loads our export.
    original, exported = CheckpointReader(tmp_path / "hf"), CheckpointReader(tmp_path / "out")
    assert sorted(exported.keys()) == sorted(
        k for k in original.keys() if k != "lm_head.weight" or kind not in ("qwen2", "gemma3")
    )
    for name in exported.keys():
        np.testing.assert_array_equal(exported[name], original[name])
    served = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens, valid, positions = padded_batch()
    np.testing.assert_allclose(
        hf_logits(served, tokens, valid, positions)[valid],
        our_logits(model, tokens, valid, positions)[valid],
        atol=1e-4,
    )


def test_bfloat16_parameters_load_and_run(tmp_path):
    save_tiny("llama", str(tmp_path))
    model = load_hf(tmp_path, param_dtype="bfloat16", dtype="bfloat16")
    assert model.embed[...].dtype == jnp.bfloat16
    tokens, valid, positions = padded_batch()
    logits = our_logits(model, tokens, valid, positions)
    reference = our_logits(load_hf(tmp_path), tokens, valid, positions)
    assert logits.dtype == np.float32  # logits are float32 even in a bfloat16 model
    assert np.abs(logits[valid] - reference[valid]).max() < 0.1  # bfloat16 rounding only


@pytest.mark.parametrize("preset", ["tiny_qwen2", "tiny_gemma3"])
def test_kv_cache_decoding_equals_the_full_forward(preset):
    model = Transformer(get_preset(preset), rngs=nnx.Rngs(0))
    tokens, valid, positions = padded_batch()
    full, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid))
    cache = KVCache.empty(model.cfg, tokens.shape[0], 16)
    pieces = []
    for lo, hi in ((0, 6), (6, 7), (7, 8), (8, 10)):  # prefill, then one token at a time, then two
        h, cache = model(
            jnp.asarray(tokens[:, lo:hi]), jnp.asarray(positions[:, lo:hi]), jnp.asarray(valid[:, lo:hi]), cache
        )
        pieces.append(h)
    assert int(cache.end) == 10
    np.testing.assert_allclose(np.concatenate(pieces, axis=1)[valid], np.asarray(full)[valid], atol=1e-5)


def test_remat_changes_neither_value_nor_gradient():
    cfg = get_preset("tiny")
    plain, remat = Transformer(cfg, rngs=nnx.Rngs(1)), Transformer(get_preset("tiny", remat=True), rngs=nnx.Rngs(1))
    tokens, valid, positions = (jnp.asarray(x) for x in padded_batch())

    def loss(model):
        hidden, _ = model(tokens, positions, valid)
        return jnp.sum(jnp.where(valid[..., None], hidden, 0) ** 2)

    (v1, g1), (v2, g2) = nnx.value_and_grad(loss)(plain), nnx.value_and_grad(loss)(remat)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    # float32 rounding only: the rematerialised scan body is fused differently (errors ~2e-5 relative)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


@pytest.mark.parametrize(("data", "fsdp", "tensor"), [(1, 4, 2), (2, 2, 2)])
def test_sharded_forward_equals_single_device(data, fsdp, tensor, tmp_path):
    mesh = make_mesh(data=data, fsdp=fsdp, tensor=tensor)
    cfg = get_preset("tiny_qwen2")
    sharded = create_sharded(cfg, mesh, seed=3)
    # Created in place: the stacked MLP kernel [L, d, f] is split over fsdp (rows) and tensor (columns).
    kernel = sharded.layers.mlp.gate.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (
        2,
        64 // fsdp,
        128 // tensor,
    )
    single = Transformer(cfg, rngs=nnx.Rngs(3))
    tokens, valid, positions = padded_batch()
    tokens, valid, positions = (np.concatenate([x] * 4)[:8] for x in (tokens, valid, positions))  # batch 8
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    forward = nnx.jit(lambda m, t, p, v: m.logits(m(t, p, v)[0]))
    out = forward(sharded, *(jax.device_put(x, batch) for x in (tokens, positions, valid)))
    np.testing.assert_allclose(np.asarray(out)[valid], our_logits(single, tokens, valid, positions)[valid], atol=1e-5)
    # load_hf with a mesh streams each tensor into the same shardings.
    export_hf(single, tmp_path)
    loaded = load_hf(tmp_path, mesh=mesh)
    expected = param_shardings(loaded, mesh)["layers"]["attn"]["q"]["kernel"]
    assert loaded.layers.attn.q.kernel[...].sharding == expected
    np.testing.assert_array_equal(
        np.asarray(loaded.layers.attn.q.kernel[...]), np.asarray(single.layers.attn.q.kernel[...])
    )


def test_sharded_parameter_gradient_equals_single_device():
    # The backward pass of the layer scan with stacked [L, ...] parameters split over 8 devices
    # (fsdp, as the default config) differs from one device by float32 summation order only:
    # ~1e-7 of each leaf's largest entry (the 2x4-process test in test_multiprocess.py relies on it).
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    cfg = get_preset("tiny")
    sharded, single = create_sharded(cfg, mesh, seed=3), Transformer(cfg, rngs=nnx.Rngs(3))
    tokens, valid, positions = (np.concatenate([x] * 4)[:8] for x in padded_batch())

    def loss(model, t, p, v):
        logp = jax.nn.log_softmax(model.logits(model(t, p, v)[0])[:, :-1])
        target = jnp.take_along_axis(logp, t[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(v[:, 1:], target, 0)) / jnp.sum(v[:, 1:])

    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    step = nnx.jit(nnx.value_and_grad(loss))
    v8, g8 = step(sharded, *(jax.device_put(x, batch) for x in (tokens, positions, valid)))
    v1, g1 = step(single, *(jnp.asarray(x) for x in (tokens, positions, valid)))
    assert g8.layers.mlp.gate.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    np.testing.assert_allclose(v8, v1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a).max() > 0
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * float(np.abs(b).max()))


def test_uneven_dimensions_fall_back_to_replication():
    mesh = make_mesh(data=1, fsdp=2, tensor=4)  # 2 kv heads * 16 = 32 columns split 4 ways is fine;
    cfg = ModelConfig(vocab_size=130, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=2)
    model = create_sharded(cfg, mesh)  # ... but a vocabulary of 130 is not divisible by 4
    assert model.embed[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_every_preset_survives_a_config_json_round_trip():
    from gtpo_jax.models.presets import PRESETS
    from gtpo_jax.models.weights import config_to_hf

    for name, cfg in PRESETS.items():
        assert config_from_hf(config_to_hf(cfg)) == cfg, name
    gemma = config_to_hf(PRESETS["gemma3_270m"])
    assert gemma["model_type"] == "gemma3_text" and gemma["layer_types"].count("full_attention") == 3
    assert gemma["hidden_activation"] == "gelu_pytorch_tanh" and gemma["sliding_window"] == 512


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        config_from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match=r"num_heads=6 must be a multiple of model\.num_kv_heads=4"):
        ModelConfig(vocab_size=8, hidden_size=24, intermediate_size=8, num_layers=1, num_heads=6, num_kv_heads=4)
    with pytest.raises(KeyError, match="did you mean 'qwen2_5_7b'"):
        get_preset("qwen2.5_7b")
    with pytest.raises(ValueError, match="sliding"):
        config_from_hf({"model_type": "qwen2", "use_sliding_window": True})
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        config_from_hf({"model_type": "gemma3_text", "final_logit_softcapping": 30.0})
    with pytest.raises(ValueError, match="model.architecture='gemma2'"):
        get_preset("tiny", architecture="gemma2")
    with pytest.raises(ValueError, match=r"model.qk_norm=False: a qwen3 checkpoint needs True"):
        from gtpo_jax.models.weights import config_to_hf

        config_to_hf(get_preset("tiny", architecture="qwen3"))
    with pytest.raises(ValueError, match="sliding_window=0: must be > 0"):
        get_preset("tiny_gemma3", sliding_window=0)
