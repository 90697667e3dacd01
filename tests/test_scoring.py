"""The teacher-forced scoring pass: alignment, masking, temperature, no gradient into entropy."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from gtpo_jax.models.presets import get_preset
from gtpo_jax.models.transformer import Transformer
from gtpo_jax.scoring import score


def _rollout():
    rng = np.random.default_rng(0)
    P, G, Lp, T = 2, 3, 5, 6
    prompts = rng.integers(1, 128, (P, Lp))
    prompt_valid = np.ones((P, Lp), bool)
    prompt_valid[1, :2] = False  # left padding
    responses = rng.integers(1, 128, (P, G, T))
    lengths = np.array([[6, 3, 1], [4, 6, 2]])
    mask = (np.arange(T) < lengths[..., None]).astype(np.float32)
    return prompts, prompt_valid, responses, mask


def test_scores_equal_dense_log_softmax_of_the_unpadded_sequence():
    model = Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0))
    prompts, prompt_valid, responses, mask = _rollout()
    logp, entropy = score(
        model, *map(jnp.asarray, (prompts, prompt_valid, responses, mask)), temperature=0.7, vocab_chunk=48
    )
    for p in range(2):
        for g in range(3):
            n = int(mask[p, g].sum())
            seq = np.concatenate([prompts[p][prompt_valid[p]], responses[p, g, :n]])  # no padding at all
            hidden, _ = model(jnp.asarray(seq[None]), jnp.arange(len(seq))[None], jnp.ones((1, len(seq)), bool))
            z = np.asarray(model.logits(hidden))[0] / 0.7
            lp = jax.nn.log_softmax(z, axis=-1)
            start = len(seq) - n - 1  # the logits before the first response token
            expected = np.take_along_axis(np.asarray(lp[start : start + n]), responses[p, g, :n, None], -1)[:, 0]
            np.testing.assert_allclose(logp[p, g, :n], expected, atol=1e-5)
            np.testing.assert_allclose(entropy[p, g, :n], -(np.exp(lp) * lp).sum(-1)[start : start + n], atol=1e-5)
            assert np.all(np.asarray(logp[p, g, n:]) == 0) and np.all(np.asarray(entropy[p, g, n:]) == 0)


def test_entropy_gets_no_gradient_and_logp_does():
    model = Transformer(get_preset("tiny"), rngs=nnx.Rngs(1))
    args = tuple(map(jnp.asarray, _rollout()))
    g_ent = nnx.grad(lambda m: jnp.sum(score(m, *args)[1]))(model)
    g_logp = nnx.grad(lambda m: jnp.sum(score(m, *args)[0]))(model)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g_ent))
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(g_logp))
