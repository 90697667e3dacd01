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


_GEMMA3_4B_VISION = {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                     "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                     "patch_size": 14, "vision_use_head": False}  # fmt: skip
SPARSE_CONFIGS = {
    # google/gemma-3-4b-it's config.json (transformers 4.50): its text_config names six keys, the
    # rest (vocabulary, heads, head_dim 256, rope bases 1e6 / 1e4, ...) are Gemma3TextConfig defaults.
    "gemma3_4b_multimodal": {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "boi_token_index": 255999, "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
        "initializer_range": 0.02, "mm_tokens_per_image": 256, "torch_dtype": "bfloat16",
        "transformers_version": "4.50.0.dev0", "vision_config": _GEMMA3_4B_VISION,
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
    },
    # A text config with a vocabulary but no rope bases, head_dim, query_pre_attn_scalar, window
    # or maximum length: head_dim stays 256 although hidden / heads = 160.
    "gemma3_text_sparse": {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
                           "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
                           "num_key_value_heads": 1, "sliding_window_pattern": 6},
    "gemma3_text_bare": {"model_type": "gemma3_text"},
    "llama_bare": {"model_type": "llama"},
    "qwen2_bare": {"model_type": "qwen2"},
    "qwen3_bare": {"model_type": "qwen3"},
    # Heads given, kv heads and head_dim not: Llama takes kv = heads and head_dim = hidden / heads,
    # Qwen2 / Qwen3 their class defaults (32 kv heads; Qwen3 head_dim 128).
    "llama_heads": {"model_type": "llama", "num_attention_heads": 64, "hidden_size": 2048},
    "qwen2_heads": {"model_type": "qwen2", "num_attention_heads": 64, "hidden_size": 2048},
    "qwen3_heads": {"model_type": "qwen3", "num_attention_heads": 64, "hidden_size": 2048},
}  # fmt: skip


def _as_transformers_reads_it(directory):
    """The ModelConfig fields of `transformers.AutoConfig`'s reading of `directory/config.json`."""
    from transformers import AutoConfig

    outer = AutoConfig.from_pretrained(directory)
    c = getattr(outer, "text_config", None) or outer
    rope = c.rope_parameters
    full = rope.get("full_attention", rope)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    fields = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        head_dim=head_dim,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        tie_embeddings=outer.tie_word_embeddings,
        rope_theta=full["rope_theta"],
        rope_linear_factor=full.get("factor", 1.0) if full.get("rope_type") == "linear" else 1.0,
        query_pre_attn_scalar=getattr(c, "query_pre_attn_scalar", None) or head_dim,
        layer_types=tuple(getattr(c, "layer_types", None) or ("full_attention",) * c.num_hidden_layers),
    )
    if "sliding_attention" in rope:
        fields |= dict(rope_local_theta=rope["sliding_attention"]["rope_theta"], sliding_window=c.sliding_window)
    return fields


@pytest.mark.parametrize("name", list(SPARSE_CONFIGS))
def test_sparse_config_json_reads_as_transformers_reads_it(name, tmp_path):
    """A config.json that leaves keys out (as transformers 4.x writes them, and the Hub's files are)
    takes its family's transformers config-class defaults, field for field."""
    import json

    from gtpo_jax.models.weights import read_config

    (tmp_path / "config.json").write_text(json.dumps(SPARSE_CONFIGS[name]))
    theirs = _as_transformers_reads_it(tmp_path)
    ours = read_config(tmp_path)
    assert {k: getattr(ours, k) for k in theirs} == theirs
    if name.startswith("gemma3"):
        assert ours.head_dim == 256 and ours.rope_theta == 1e6 and ours.rope_local_theta == 1e4


def test_tie_word_embeddings_defaults_to_the_family_default():
    """A config.json without `tie_word_embeddings` gets transformers' default for its family
    (Gemma 3: tied; Llama / Qwen: untied)."""
    from gtpo_jax.models.weights import config_to_hf

    for preset, tied in (("tiny_gemma3", True), ("tiny", False), ("tiny_qwen3", False)):
        hf = config_to_hf(get_preset(preset, tie_embeddings=tied))
        del hf["tie_word_embeddings"]
        assert config_from_hf(hf).tie_embeddings is tied, preset


def _as_multimodal(src, dst, text_prefix, lm_head):
    """A Gemma3ForConditionalGeneration-style copy of the tiny text checkpoint `src`: config with
    `text_config`, text tensors under `text_prefix`, plus a (fake) vision tower and projector."""
    import json

    from gtpo_jax.models.safetensors_io import save_checkpoint

    original = CheckpointReader(src)
    tensors = {}
    for name in original.keys():
        if name == "lm_head.weight":
            tensors[lm_head] = np.asarray(original[name])
        else:
            tensors[text_prefix + name.removeprefix("model.")] = np.asarray(original[name])
    vision = "model.vision_tower." if text_prefix.startswith("model.") else "vision_tower."
    tensors[vision + "vision_model.embeddings.patch_embedding.weight"] = np.ones((8, 3, 2, 2), np.float32)
    tensors[vision.replace("vision_tower", "multi_modal_projector") + "mm_input_projection_weight"] = np.ones(
        (8, 64), np.float32
    )
    save_checkpoint(tensors, dst)
    text = json.loads((src / "config.json").read_text())
    text.pop("tie_word_embeddings")  # the wrapper's configs keep it at the top level
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model"},
        "tie_word_embeddings": True,
    }
    (dst / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("text_prefix", "lm_head"),
    [("model.language_model.", "lm_head.weight"), ("language_model.model.", "language_model.lm_head.weight")],
)
def test_multimodal_gemma3_checkpoint_loads_its_text_model(text_prefix, lm_head, tmp_path, caplog):
    """Gemma3ForConditionalGeneration checkpoints (transformers 5.x and 4.x layouts) load their text
    model, the vision tower left out with a warning that says so."""
    save_tiny("gemma3", str(tmp_path / "text"))
    _as_multimodal(tmp_path / "text", tmp_path / "mm", text_prefix, lm_head)
    text, multimodal = load_hf(tmp_path / "text"), load_hf(tmp_path / "mm")
    assert multimodal.cfg == text.cfg
    for a, b in zip(jax.tree.leaves(nnx.state(text)), jax.tree.leaves(nnx.state(multimodal)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any("vision" in r.getMessage() and "not loaded" in r.getMessage() for r in caplog.records)


def test_multimodal_checkpoint_with_unknown_tensor_names_is_refused(tmp_path):
    save_tiny("gemma3", str(tmp_path / "text"))
    _as_multimodal(tmp_path / "text", tmp_path / "mm", "text_model.", "text_model.lm_head.weight")
    with pytest.raises(ValueError, match=r"mm/config\.json.*text_config.*model\.language_model\..*convert"):
        load_hf(tmp_path / "mm")


def test_stacked_layers_draw_the_same_weights_as_separate_layers():
    # A seed's weights do not depend on the stacked (scanned) layout: the model equals the one
    # built as an embedding and then a list of separate blocks from the same stream (the layout
    # before layers were stacked), so runs keep their initialisation across the change.
    from gtpo_jax.models.transformer import Block

    cfg = get_preset("tiny", vocab_size=24)
    stacked = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))
    rngs = nnx.Rngs(0)
    rngs.params()  # the embedding's draw
    blocks = [nnx.to_pure_dict(nnx.state(Block(cfg, rngs=rngs))) for _ in range(cfg.num_layers)]
    for i, block in enumerate(blocks):
        for a, b in zip(jax.tree.leaves(block), jax.tree.leaves(stacked["layers"]), strict=True):
            np.testing.assert_array_equal(a, b[i])
