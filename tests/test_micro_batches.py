"""Micro-batches are sequence rows (training/update.py): the scoring pass and the update cut the
`P x G` sequences of a batch into micro-batches of `train.micro_batch_size` rows, a group may
straddle two of them, and a micro-batch is padded with masked rows to the mesh's batch width.
None of this changes the log-probs, the loss or its gradient: the advantages are formed on the
whole batch first, and the loss's (sum, denominator) pairs add up over micro-batches."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import tiny_config

from gtpo_jax.losses import compute_loss
from gtpo_jax.models.sharding import make_mesh
from gtpo_jax.models.transformer import Transformer
from gtpo_jax.scoring import score
from gtpo_jax.training.build import build
from gtpo_jax.training.update import Groups, micro_split, step_fns

P, G, T, LP = 3, 4, 6, 5  # 12 sequences


def test_micro_split_keeps_row_order_and_pads_with_real_rows():
    index, real = micro_split(12, 6, 4)  # 2 micro-batches of 6 rows, each padded to 8
    np.testing.assert_array_equal(index, [[0, 1, 2, 3, 4, 5, 0, 1], [6, 7, 8, 9, 10, 11, 6, 7]])
    np.testing.assert_array_equal(real, [[1, 1, 1, 1, 1, 1, 0, 0]] * 2)
    index, real = micro_split(10, 4, 1)  # a shorter last micro-batch: its tail repeats real rows
    np.testing.assert_array_equal(index, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]])
    np.testing.assert_array_equal(real.sum(1), [4, 4, 2])


def _inputs(run):
    """A hand-made batch: responses of different lengths, half of each group right."""
    keys = jax.random.split(jax.random.key(7), 4)
    prompts = jax.random.randint(keys[0], (P, LP), 1, run.model_cfg.vocab_size)
    prompt_valid = jnp.arange(LP)[None, :] >= jnp.array([[0], [2], [1]])  # left padding
    tokens = jax.random.randint(keys[1], (P, G, T), 1, run.model_cfg.vocab_size)
    lengths = jnp.array([[6, 2, 5, 3], [1, 6, 4, 6], [3, 3, 6, 2]], jnp.int32)
    mask = jnp.arange(T) < lengths[..., None]
    rewards = jnp.array([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)
    verdicts = (rewards, jnp.ones((P, G), bool), rewards > 0, jnp.ones((P,), bool))
    return Groups(prompts, prompt_valid, tokens, mask), verdicts, lengths, keys[2:]


def _reference(run, params, groups, batch):
    """The whole-batch loss and its gradient, straight from the `[P, G, T]` groups."""
    cfg, model = run.cfg, run.model

    def loss(p):
        logp, _ = score(model.merge(p), *groups, temperature=cfg.rollout.temperature)
        out = compute_loss(cfg.loss, logp, batch, padded_len=cfg.rollout.max_new_tokens)
        return out.loss_sum / out.denominator

    return jax.value_and_grad(loss)(params)


# (algorithm, devices, micro_batch_size, padded rows): 12 sequences in groups of 4, micro-batches
# of 6 (group 1 straddles two) or 2 (every group split in two), on 4 devices padded with masked rows.
# grpo's case (4 devices, 2 rows padded to 4) repeats what gtpo's shows (4 devices, 6 padded to 8):
# slow, to keep the default suite within its time.
SPLITS = [
    pytest.param("grpo", 4, 2, 4, marks=pytest.mark.slow),
    ("dapo", 1, 6, 6),
    ("gtpo", 4, 6, 8),
    ("grpo_s", 1, 2, 2),
]


@pytest.mark.parametrize(("algorithm", "devices", "size", "padded"), SPLITS)
def test_micro_batched_loss_and_gradient_equal_the_whole_batch(tmp_path, algorithm, devices, size, padded):
    """The scoring pass's log-probs and entropies, and the update's loss and gradient (SGD with
    learning rate 1: the parameter step is minus the gradient) over micro-batches of sequence
    rows, equal the whole batch's computed in one pass over the `[P, G, T]` groups."""
    overrides = {"loss.algorithm": algorithm, "loss.group_size": G, "train.prompts_per_step": P}
    overrides |= {"rollout.max_new_tokens": T, "train.mini_batches": 1, "loss.dynamic_sampling": False}
    cfg = tiny_config(tmp_path, **overrides)
    run = build(cfg, make_mesh(devices=jax.devices()[:1]), train=False)
    params = nnx.to_pure_dict(nnx.state(Transformer(run.model_cfg, rngs=nnx.Rngs(0))))
    groups, verdicts, lengths, keys = _inputs(run)
    whole = step_fns(run.model, cfg, optax.sgd(1.0), run.mesh)  # for its loss preparation
    logp, entropy = jax.jit(lambda p: score(run.model.merge(p), *groups))(params)
    old_logp = jnp.where(groups.mask, logp + 0.3 * jax.random.normal(keys[0], logp.shape), 0.0)  # some ratios clip
    ref_logp = jnp.where(groups.mask, logp + 0.2 * jax.random.normal(keys[1], logp.shape), 0.0)
    ref_logp = ref_logp if cfg.loss.kl_coef > 0 else None
    finish = jnp.zeros((P, G), jnp.int32)
    batch, _ = whole.prepare(verdicts, groups, lengths, finish, old_logp, entropy, ref_logp)
    batch = jax.tree.map(np.asarray, batch)  # on the host: `prepare` placed it on the 1-device mesh
    want_loss, want_grad = _reference(run, params, groups, batch)
    assert float(want_loss) != 0 and optax.tree.norm(want_grad) > 0

    mesh = make_mesh(fsdp=devices, devices=jax.devices()[:devices])
    fns = step_fns(
        run.model, tiny_config(tmp_path, **overrides, **{"train.micro_batch_size": size}), optax.sgd(1.0), mesh
    )
    assert (fns.micro_rows, fns.padded_micro_rows) == (size, padded)
    with jax.set_mesh(mesh):
        got_logp, got_entropy = fns.score(params, groups)
        mini = fns.take((groups, batch), jnp.int32(0))
        new, metrics, _ = fns.update(_state(params), *mini)
    np.testing.assert_allclose(got_logp, logp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_entropy, entropy, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    step = jax.tree.map(lambda new, old: np.asarray(new) - np.asarray(old), new.params, params)
    jax.tree.map(lambda s, g: np.testing.assert_allclose(-s, g, rtol=1e-4, atol=1e-7), step, want_grad)


def _state(params):
    """A state whose buffers the update may donate (the test keeps `params`)."""
    from gtpo_jax.training.state import init_state

    return init_state(jax.tree.map(jnp.copy, params), optax.sgd(1.0), 0)


def test_the_update_donates_its_state(tmp_path):
    """The update's state buffers become the new state's (`donate_argnums`): the memory plan then
    counts the state once, and a caller must not reuse the state it passed in."""
    cfg = tiny_config(tmp_path, **{"loss.algorithm": "dapo", "loss.group_size": G, "train.prompts_per_step": P})
    run = build(cfg, make_mesh(devices=jax.devices()[:1]), train=False)
    params = nnx.to_pure_dict(nnx.state(Transformer(run.model_cfg, rngs=nnx.Rngs(0))))
    fns = step_fns(run.model, cfg, optax.sgd(1.0), run.mesh)
    groups, verdicts, lengths, _ = _inputs(run)
    logp, entropy = fns.score(params, groups)
    batch, _ = fns.prepare(verdicts, groups, lengths, jnp.zeros((P, G), jnp.int32), logp, entropy, None)
    state = _state(params)
    fns.update(state, groups, batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(state.params))
