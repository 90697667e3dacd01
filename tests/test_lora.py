"""LoRA (models/lora.py): zero-B adapters change nothing, only adapters train, the sampler and the
KL reference see the right weights, the PEFT export loads in `peft`, and a LoRA run checkpoints."""

import dataclasses
import json

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hf_models import hf_logits, padded_batch, save_tiny
from train_helpers import tiny_config

from gtpo_jax import config_sections
from gtpo_jax.config import ConfigError
from gtpo_jax.models import lora, transformer
from gtpo_jax.models.presets import get_preset
from gtpo_jax.models.sharding import ModelDef, abstract_model, make_mesh, merge_params, split_model
from gtpo_jax.models.transformer import Transformer
from gtpo_jax.models.weights import export_hf, load_hf
from gtpo_jax.rollout.sampler import sample, sampling_config
from gtpo_jax.scoring import score
from gtpo_jax.training.build import build
from gtpo_jax.training.checkpoint import Checkpointer, abstract_params
from gtpo_jax.training.loop import Trainer, kl_reference
from gtpo_jax.training.state import init_state
from gtpo_jax.training.update import Groups

TOKENS = jnp.asarray([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
VALID = jnp.asarray([[False, False, True, True, True, True], [True] * 6])


def logits(model):
    hidden, _ = model(TOKENS, transformer.positions_from_valid(VALID), VALID)
    return np.asarray(model.logits(hidden))


def with_b(params, scale=0.05, seed=1):
    """`params` with every adapter's B set to random values (as training would move it)."""
    flat = traverse_util.flatten_dict(params)
    keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
    out = {p: scale * jax.random.normal(next(keys), v.shape) if p[-1] == "lora_b" else v for p, v in flat.items()}
    return traverse_util.unflatten_dict(out)


def lora_model(preset="tiny_qwen2", **fields):
    base_cfg = get_preset(preset, **{k: v for k, v in fields.items() if not k.startswith("lora")})
    cfg = dataclasses.replace(
        base_cfg, lora_rank=4, lora_alpha=8.0, **{k: v for k, v in fields.items() if k.startswith("lora")}
    )
    return Transformer(base_cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_b_adapters_give_the_base_logits_exactly(dtype):
    base, adapted = lora_model(param_dtype=dtype, dtype=dtype)
    params = nnx.to_pure_dict(nnx.state(adapted))
    adapters, frozen = lora.split_trainable(params)
    same = jax.tree.map(np.array_equal, frozen, nnx.to_pure_dict(nnx.state(base)))
    assert all(jax.tree.leaves(same))  # the same base weights, seed for seed
    assert {str(x.dtype) for x in jax.tree.leaves(adapters)} == {"float32"}  # whatever the base's dtype
    assert {k for k in adapters["layers"]["attn"]} == {"q", "k", "v", "o"} and len(adapters["layers"]["mlp"]) == 3
    np.testing.assert_array_equal(logits(adapted), logits(base))
    changed = merge_params(*abstract_model(adapted.cfg), with_b(params))
    assert np.abs(logits(changed) - logits(base)).max() > 1e-3  # nonzero B does change them


def test_targets_choose_the_adapted_projections_and_bad_ones_are_named():
    _, adapted = lora_model(lora_targets=("q", "down"))
    adapters, _ = lora.split_trainable(nnx.to_pure_dict(nnx.state(adapted)))
    assert set(adapters["layers"]["attn"]) == {"q"} and set(adapters["layers"]["mlp"]) == {"down"}
    assert config_sections.LORA_TARGETS == transformer.LORA_TARGETS
    with pytest.raises(
        ConfigError, match=r"model.lora_targets=\('q', 'gat'\): unknown target 'gat'; did you mean 'gate'"
    ):
        config_sections.ModelSection(lora_rank=8, lora_targets=("q", "gat"))
    with pytest.raises(ConfigError, match="model.lora_dropout=1.5"):
        config_sections.ModelSection(lora_rank=8, lora_dropout=1.5)
    # A frozen bfloat16 base is allowed only under LoRA (full training needs float32 master weights).
    assert config_sections.ModelSection(lora_rank=8, param_dtype="bfloat16").param_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="model.param_dtype='bfloat16'"):
        config_sections.ModelSection(param_dtype="bfloat16")


def test_dropout_acts_only_when_a_key_is_given():
    _, adapted = lora_model(lora_dropout=0.5)
    model_def, params = split_model(adapted)
    model = model_def.merge(with_b(params))
    positions = transformer.positions_from_valid(VALID)
    plain = model(TOKENS, positions, VALID)[0]
    dropped = model(TOKENS, positions, VALID, dropout_key=jax.random.key(0))[0]
    np.testing.assert_array_equal(np.asarray(model(TOKENS, positions, VALID)[0]), np.asarray(plain))
    assert np.abs(np.asarray(dropped) - np.asarray(plain)).max() > 1e-3


def _step_inputs(run, params, kl):
    """One hand-made rollout batch of the run's shapes and its loss batch (half the group right)."""
    P, G, T, Lp = 4, run.cfg.loss.group_size, run.cfg.rollout.max_new_tokens, 8
    tokens = jax.random.randint(jax.random.key(3), (P, G, T), 1, run.model_cfg.vocab_size)
    groups = Groups(jnp.ones((P, Lp), jnp.int32), jnp.ones((P, Lp), bool), tokens, jnp.ones((P, G, T), bool))
    old_logp, entropy = run.fns.score(params, groups)
    ref_logp = run.fns.score(kl_reference(run.cfg, params, None), groups)[0] if kl else None
    rewards = jnp.tile(jnp.arange(G) % 2, (P, 1)).astype(jnp.float32)
    verdicts = (rewards, jnp.ones((P, G), bool), rewards > 0, jnp.ones((P,), bool))
    lengths, finish = jnp.full((P, G), T, jnp.int32), jnp.zeros((P, G), jnp.int32)
    return groups, run.fns.prepare(verdicts, groups, lengths, finish, old_logp, entropy, ref_logp)[0]


def test_only_adapters_get_gradients_and_optimizer_state(tmp_path):
    cfg = tiny_config(tmp_path, **{"loss.algorithm": "grpo", "model.lora_rank": 4, "train.mini_batches": 1})
    run = build(cfg, make_mesh(devices=jax.devices()[:1]), train=True)
    params = with_b(nnx.to_pure_dict(nnx.state(Transformer(run.model_cfg, rngs=nnx.Rngs(0)))))
    state = init_state(params, run.optimizer, 0)
    adapters, frozen = lora.split_trainable(params)
    adam = state.opt_state[1][0]  # (clip, adamw) -> adam's (count, mu, nu)
    assert jax.tree.structure(adam.mu) == jax.tree.structure(adapters)
    groups, batch = _step_inputs(run, params, kl=True)
    copy = lambda: jax.tree.map(jnp.copy, state)  # noqa: E731  (the update donates its state)
    new, metrics, _ = run.fns.update(copy(), groups, batch)
    assert float(metrics["grad_norm"]) > 0 and float(metrics["empty_update"]) == 0
    new_adapters, new_frozen = lora.split_trainable(new.params)
    assert jax.tree.all(jax.tree.map(np.array_equal, new_frozen, frozen))  # the base never moves
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), new_adapters, adapters)
    assert all(jax.tree.leaves(moved))  # every A and B of every target does
    # The gradient of the loss w.r.t. the whole tree is what the update sees, restricted to the adapters.
    dropout = run.fns.update(copy(), groups, batch, jax.random.key(0))[0].params
    assert jax.tree.all(jax.tree.map(np.array_equal, lora.split_trainable(dropout)[1], frozen))


def test_the_sampler_and_the_scoring_pass_use_the_adapters():
    _, adapted = lora_model()
    model_def, params = split_model(adapted)
    cfg = sampling_config(group_size=2, max_new_tokens=6, prompt_buckets=(8,), temperature=1.0)
    prompts, valid = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), bool)
    key = jax.random.key(5)
    zero_b = sample(model_def, params, prompts, valid, key, cfg)
    trained = sample(model_def, with_b(params), prompts, valid, key, cfg)
    assert np.abs(np.asarray(trained.logp) - np.asarray(zero_b.logp)).max() > 1e-3
    # The scoring pass of the adapted tree gives the sampler's own log-probs.
    logp, _ = score(model_def.merge(with_b(params)), prompts, valid, trained.tokens, trained.mask)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(trained.logp), atol=2e-5)


def test_kl_reference_is_the_base_with_the_adapters_off(tmp_path):
    cfg = tiny_config(tmp_path, **{"loss.algorithm": "grpo", "model.lora_rank": 4})
    base, adapted = lora_model()
    params = with_b(nnx.to_pure_dict(nnx.state(adapted)))
    ref = kl_reference(cfg, params, None)
    shared = jax.tree.map(lambda a, b: a is b, lora.split_trainable(ref)[1], lora.split_trainable(params)[1])
    assert all(jax.tree.leaves(shared))  # the base's own arrays: no copy of the weights
    model_def = ModelDef.of(adapted.cfg)
    np.testing.assert_array_equal(logits(model_def.merge(ref)), logits(base))
    no_kl = tiny_config(tmp_path, **{"loss.algorithm": "dapo", "model.lora_rank": 4})  # DAPO has no KL term
    assert kl_reference(no_kl, params, None) is None


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_peft_export_loads_in_peft_and_matches_our_merged_model(kind, tmp_path):
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    reference = save_tiny(kind, str(tmp_path / "base"))
    base = load_hf(tmp_path / "base")
    cfg = dataclasses.replace(base.cfg, lora_rank=4, lora_alpha=8.0, lora_targets=("q", "v", "o", "gate", "down"))
    params = lora.add_adapters(nnx.to_pure_dict(nnx.state(base)), cfg, make_mesh(devices=jax.devices()[:1]))
    model = merge_params(*abstract_model(cfg), with_b(params, scale=0.1))
    assert export_hf(model, tmp_path / "adapter", adapters="peft", base_model=str(tmp_path / "base")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    export_hf(model, tmp_path / "merged")
    tokens, valid, positions = padded_batch()
    hidden, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid))
    ours = np.asarray(model.logits(hidden))
    merged = load_hf(tmp_path / "merged")
    hidden, _ = merged(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(merged.logits(hidden)), ours, atol=1e-4)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {
        "q_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "down_proj",
    }
    plain = hf_logits(reference, tokens, valid, positions)
    with_adapter = peft.PeftModel.from_pretrained(reference, str(tmp_path / "adapter")).eval()
    theirs = hf_logits(with_adapter, tokens, valid, positions)
    assert np.abs(theirs[valid] - plain[valid]).max() > 1e-2  # the adapters were loaded, and matter
    # (padded query rows attend to nothing: their logits are arbitrary and differ by design)
    np.testing.assert_allclose(theirs[valid], ours[valid], atol=1e-4, rtol=0)


@pytest.mark.slow  # trains a tiny run end to end (the CI runs the slow suite too)
def test_a_lora_run_checkpoints_adapters_and_their_optimizer_state(tmp_path):
    settings = {"loss.algorithm": "grpo", "model.lora_rank": 4, "model.lora_dropout": 0.1, "reward.timeout_s": 60.0}
    trainer = Trainer(tiny_config(tmp_path, **settings))
    try:
        trainer.run()
    finally:
        trainer.close()
    assert not (tmp_path / "reference").exists()  # the KL reference is the base with adapters off
    fresh = Trainer(tiny_config(tmp_path, **settings, **{"warmup.steps": 0}))
    try:
        assert fresh.restore() == 2
    finally:
        fresh.close()
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), fresh.state, trainer.state)
    assert all(jax.tree.leaves(same))
    adapters, _ = lora.split_trainable(fresh.state.params)
    assert jax.tree.structure(fresh.state.opt_state[1][0].mu) == jax.tree.structure(adapters)
    assert int(fresh.state.step) == 2
    # Evaluation reads the parameters alone (base + adapters) into the run's abstract model.
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    params, _ = checkpoints.restore_params(2, abstract_params(fresh.built.model, fresh.built.mesh))
    checkpoints.close()
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, jax.device_get(trainer.state.params))))
