"""The paper-scale configs trace: the full train step under `jax.eval_shape` on abstract
parameters (nothing of the model's size is allocated)."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import pytest
from train_helpers import load_config_file

from gtpo_jax.config import from_config_dict
from gtpo_jax.models.presets import get_preset
from gtpo_jax.models.sharding import ModelDef, abstract_model, make_mesh
from gtpo_jax.training.build import run_optimizer
from gtpo_jax.training.state import init_state
from gtpo_jax.training.update import Groups, step_fns

SDS = jax.ShapeDtypeStruct


@pytest.mark.parametrize(("path", "billions"), [("configs/qwen2_5_7b_dapo_math.py", 7.6)])
def test_paper_config_train_step_traces_on_abstract_parameters(path, billions):
    cfg = from_config_dict(load_config_file(path))
    m, t = cfg.model, cfg.train
    model_cfg = get_preset(m.preset, param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat)
    graphdef, abstract = abstract_model(model_cfg)
    params = nnx.to_pure_dict(abstract)
    count = sum(x.size for x in jax.tree.leaves(params))
    assert abs(count / 1e9 - billions) < 0.1, count
    optimizer = run_optimizer(cfg)  # the trainer's own (training/build.py)
    state = jax.eval_shape(lambda p: init_state(p, optimizer, 0), params)
    fns = step_fns(ModelDef(graphdef, abstract), cfg, optimizer, make_mesh(devices=jax.devices()[:1]))
    P, G, T, Lp = t.prompts_per_step, cfg.loss.group_size, cfg.rollout.max_new_tokens, cfg.rollout.prompt_buckets[-1]

    def groups(p):
        return Groups(SDS((p, Lp), jnp.int32), SDS((p, Lp), bool), SDS((p, G, T), jnp.int32), SDS((p, G, T), bool))

    logp, entropy = jax.eval_shape(fns.score, state.params, groups(P))
    assert logp.shape == entropy.shape == (P, G, T) and logp.dtype == jnp.float32
    batch, _ = jax.eval_shape(
        fns.prepare,
        (SDS((P, G), jnp.float32), SDS((P, G), bool), SDS((P, G), bool), SDS((P,), bool)),
        groups(P),
        SDS((P, G), jnp.int32),
        SDS((P, G), jnp.int32),
        logp,
        entropy,
        None,
    )
    assert batch.advantages.shape == (P, G, T) and batch.ref_logp is None  # no KL: no reference pass
    mb = P // t.mini_batches
    new_state, metrics, diagnostics = jax.eval_shape(
        fns.update, state, groups(mb), jax.tree.map(lambda x: SDS((mb, *x.shape[1:]), x.dtype), batch)
    )
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state.params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), params
    )
    assert metrics["loss"].shape == () and "clip_frac_high" in diagnostics
