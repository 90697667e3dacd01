"""The clipped objective, aggregation, KL, micro-batching, sharding and gradient flow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS
from rollouts import make_rollout
from test_invariants import IDS, VARIANTS

from gtpo_jax.losses import (
    LossConfig,
    compute_loss,
    finalize_diagnostics,
    mean_loss,
    merge_diagnostics,
    policy_loss,
    prepare_batch,
)
from gtpo_jax.losses.policy_loss import aggregate, aggregate_sequences, clipped_surrogate, kl_penalty, sequence_ratios


def test_clipped_surrogate_golden():
    # eps_low = 0.2, eps_high = 0.28: clip range [0.8, 1.28].
    # A = +1: w = 0.5 -> min(0.5, 0.8) = 0.5; 0.9 -> 0.9; 1.1 -> 1.1; 1.5 -> min(1.5, 1.28) = 1.28 (high clip)
    # A = -1: w = 0.5 -> min(-0.5, -0.8) = -0.8 (low clip); 0.9 -> -0.9; 1.1 -> -1.1; 1.5 -> min(-1.5, -1.28) = -1.5
    ratio = jnp.array([0.5, 0.9, 1.1, 1.5] * 2)
    adv = jnp.array([1.0] * 4 + [-1.0] * 4)
    obj, low, high = clipped_surrogate(ratio, adv, eps_low=0.2, eps_high=0.28)
    np.testing.assert_allclose(obj, [0.5, 0.9, 1.1, 1.28, -0.8, -0.9, -1.1, -1.5], rtol=1e-6)
    np.testing.assert_array_equal(low, [0, 0, 0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(high, [0, 0, 0, 1, 0, 0, 0, 0])
    # Dual clip c = 1.4 bounds the negative side: max(-1.5, 1.4 * -1) = -1.4; nothing else moves.
    obj, _, _ = clipped_surrogate(ratio, adv, eps_low=0.2, eps_high=0.28, dual_clip=1.4)
    np.testing.assert_allclose(obj, [0.5, 0.9, 1.1, 1.28, -0.8, -0.9, -1.1, -1.4], rtol=1e-6)


def test_aggregation_golden():
    # Two responses, T = 4: per-token losses [1, 2, 3, x] (3 valid) and [4, x, x, x] (1 valid).
    per_token = jnp.array([[[1.0, 2.0, 3.0, 99.0], [4.0, np.nan, 7.0, 7.0]]])
    mask = jnp.array([[[1.0, 1, 1, 0], [1, 0, 0, 0]]])
    # token_mean: (1+2+3+4) / 4 tokens
    np.testing.assert_allclose(aggregate(per_token, mask, "token_mean"), (10.0, 4.0))
    # seq_mean_token_mean: ((1+2+3)/3 + 4/1) / 2 responses = (2 + 4) / 2
    np.testing.assert_allclose(aggregate(per_token, mask, "seq_mean_token_mean"), (6.0, 2.0))
    # seq_mean_token_sum_norm, divisor T = 4: (6/4 + 4/4) / 2; with norm_len = 10: (0.6 + 0.4) / 2
    np.testing.assert_allclose(aggregate(per_token, mask, "seq_mean_token_sum_norm"), (2.5, 2.0))
    np.testing.assert_allclose(aggregate(per_token, mask, "seq_mean_token_sum_norm", norm_len=10), (1.0, 2.0))


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_sequence_aggregation_equals_spreading_over_tokens(mode):
    mask = jnp.asarray(make_rollout(seed=16).mask)
    per_seq = jnp.asarray(np.random.default_rng(0).standard_normal(mask.shape[:-1]), jnp.float32)
    spread = jnp.broadcast_to(per_seq[..., None], mask.shape)
    np.testing.assert_allclose(aggregate_sequences(per_seq, mask, mode), aggregate(spread, mask, mode), rtol=1e-6)


def test_kl_estimators_golden():
    logp, ref = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -2.0])
    mask = jnp.ones(2)
    # k1 = logp - ref = [0.5, 0]; k3 = exp(ref - logp) - (ref - logp) - 1 = e^-0.5 + 0.5 - 1 = 0.1065307, 0
    np.testing.assert_allclose(kl_penalty(logp, ref, mask, "k1"), [0.5, 0.0])
    np.testing.assert_allclose(kl_penalty(logp, ref, mask, "k3"), [np.exp(-0.5) - 0.5, 0.0], rtol=1e-6)


def test_grpo_s_sequence_objective_golden():
    # One group, G = 2. Response 0: token ratios 1.1 and 0.9 -> ŵ = (1.1 + 0.9)/2 = 1.0, Â = +1 -> 1.0.
    # Response 1: one token, ratio 1.5, Â = -1 -> min(-1.5, -1.28) = -1.5.
    # J = (1/G) (1.0 - 1.5) = -0.25, loss = 0.25, over 2 responses: (sum, denominator) = (0.5, 2).
    old = jnp.zeros((1, 2, 2))
    logp = jnp.log(jnp.array([[[1.1, 0.9], [1.5, 1.0]]]))
    mask = jnp.array([[[1.0, 1.0], [1.0, 0.0]]])
    np.testing.assert_allclose(sequence_ratios(logp, old, mask), [[1.0, 1.5]], rtol=1e-6)
    out = policy_loss(
        logp,
        old,
        jnp.array([[1.0, -1.0]]),
        mask,
        eps_low=0.2,
        eps_high=0.28,
        ratio_level="sequence",
        loss_agg="seq_mean_token_mean",
    )
    np.testing.assert_allclose((out.loss_sum, out.denominator), (0.5, 2.0), rtol=1e-6)


def test_token_objective_golden_and_diagnostics():
    # Tokens (ratio, A): (1.5, +1) -> 1.28 clipped high; (0.5, -1) -> -0.8 clipped low; (1.0, 2) -> 2.
    # token_mean loss = -(1.28 - 0.8 + 2) / 3 = -2.48 / 3.
    old = jnp.zeros((1, 1, 4))
    logp = jnp.log(jnp.array([[[1.5, 0.5, 1.0, 1.0]]]))
    adv = jnp.array([[[1.0, -1.0, 2.0, 0.0]]])
    mask = jnp.array([[[1.0, 1.0, 1.0, 0.0]]])
    entropy = jnp.array([[[0.3, 0.6, 0.9, 5.0]]])
    out = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, entropy=entropy, correct=jnp.array([[True]]))
    np.testing.assert_allclose(out.loss_sum / out.denominator, -2.48 / 3, rtol=1e-6)
    d = finalize_diagnostics(out.diagnostics)
    np.testing.assert_allclose(d["clip_frac_high"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(d["clip_frac_low"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(d["ratio_mean"], (1.5 + 0.5 + 1.0) / 3, rtol=1e-6)
    np.testing.assert_allclose(d["adv_max"], 2.0)
    np.testing.assert_allclose(d["adv_min"], -1.0)
    np.testing.assert_allclose(d["entropy_pos"], 0.6, rtol=1e-6)  # (0.3 + 0.6 + 0.9) / 3
    assert np.isnan(d["entropy_neg"])  # no O- tokens
    # approx KL (k3 of old vs new): mean of (w - 1) - log w = (0.5 - ln 1.5) + (-0.5 - ln 0.5) + 0
    np.testing.assert_allclose(d["approx_kl"], ((0.5 - np.log(1.5)) + (-0.5 - np.log(0.5))) / 3, rtol=1e-5)


def test_kl_on_identical_reference_changes_nothing_under_k3():
    ro = make_rollout(seed=11)
    base = LossConfig(algorithm="gtpo", group_size=6)
    with_kl = LossConfig(algorithm="gtpo", group_size=6, kl_coef=0.5, kl_estimator="k3")

    def run(cfg, ref):
        def f(lp):
            batch, _ = prepare_batch(cfg, **ro.loss_inputs(ref=False), ref_logp=ref)
            return mean_loss(cfg, lp, batch)

        return jax.value_and_grad(f)(jnp.asarray(ro.logp))

    v0, g0 = run(base, None)
    v1, g1 = run(with_kl, ro.logp)  # reference == current policy: k3 and its gradient vanish
    np.testing.assert_allclose(v1, v0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g1, g0, rtol=1e-6, atol=1e-6)
    v2, _ = run(with_kl, ro.ref_logp)  # a different reference adds a positive penalty
    assert v2 > v0 + 1e-3


def test_kl_needs_reference_and_is_skipped_when_off():
    ro = make_rollout(seed=12)
    cfg = LossConfig(algorithm="grpo", group_size=6)  # GRPO's recipe: kl_coef = 0.04
    batch, _ = prepare_batch(cfg, **ro.loss_inputs(ref=False))
    with pytest.raises(ValueError, match="ref_logp"):
        compute_loss(cfg, jnp.asarray(ro.logp), batch)
    off = LossConfig(algorithm="grpo", group_size=6, kl_coef=0.0)
    batch, _ = prepare_batch(off, **ro.loss_inputs())
    assert batch.ref_logp is None
    assert "kl" not in compute_loss(off, jnp.asarray(ro.logp), batch).diagnostics


def _value_and_grad_in_micro_batches(cfg, ro, n_micro):
    batch, _ = prepare_batch(cfg, **ro.loss_inputs())
    P = ro.rewards.shape[0]
    size = P // n_micro
    sums, dens, grads, diags = [], [], [], None
    for k in range(n_micro):
        part = slice(k * size, (k + 1) * size)
        mb = jax.tree.map(lambda x, part=part: x[part], batch)
        out = compute_loss(cfg, jnp.asarray(ro.logp[part]), mb)
        grads.append(jax.grad(lambda lp, mb=mb: compute_loss(cfg, lp, mb).loss_sum)(jnp.asarray(ro.logp[part])))
        sums.append(out.loss_sum)
        dens.append(out.denominator)
        diags = out.diagnostics if diags is None else merge_diagnostics(diags, out.diagnostics)
    den = sum(dens)
    return sum(sums) / den, np.concatenate(grads) / den, finalize_diagnostics(diags)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_micro_batches_give_the_same_loss_and_gradient(variant):
    ro = make_rollout(seed=13, P=8)
    cfg = LossConfig(group_size=6, **variant)
    ref_value, ref_grad, ref_diag = _value_and_grad_in_micro_batches(cfg, ro, 1)
    assert abs(ref_value) > 1e-4
    for n in (2, 4):
        value, grad, diag = _value_and_grad_in_micro_batches(cfg, ro, n)
        np.testing.assert_allclose(value, ref_value, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-6)
        for key in ref_diag:
            np.testing.assert_allclose(diag[key], ref_diag[key], rtol=1e-5, atol=1e-6, err_msg=key)


def _full_step(cfg):
    def step(rewards, mask, old_logp, entropy, ref_logp, logp):
        batch, _ = prepare_batch(cfg, rewards=rewards, mask=mask, old_logp=old_logp, entropy=entropy, ref_logp=ref_logp)
        return jax.value_and_grad(lambda lp: mean_loss(cfg, lp, batch))(logp)

    return step


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_sharding_prompts_over_8_devices_matches_one_device(variant):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    ro = make_rollout(seed=14, P=16)
    cfg = LossConfig(group_size=6, **variant)
    args = (ro.rewards, ro.mask, ro.old_logp, ro.entropy, ro.ref_logp, ro.logp)
    one = jax.devices()[0]
    value_1, grad_1 = jax.jit(_full_step(cfg))(*jax.device_put(args, one))

    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    prompts = NamedSharding(mesh, PS(("data", "fsdp")))
    sharded = jax.device_put(args, prompts)
    value_8, grad_8 = jax.jit(_full_step(cfg), out_shardings=(NamedSharding(mesh, PS()), prompts))(*sharded)
    assert len(grad_8.sharding.device_set) == 8
    # Same 1e-6 as micro-batching: only the float32 summation order across devices differs.
    np.testing.assert_allclose(value_8, value_1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_8, grad_1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_entropy_rewards_and_masks_get_no_gradient(variant):
    ro = make_rollout(seed=15)
    cfg = LossConfig(group_size=6, **variant)
    step = _full_step(cfg)

    def loss_of(rewards, mask, entropy):
        return step(rewards, mask, ro.old_logp, entropy, ro.ref_logp, jnp.asarray(ro.logp))[0]

    grads = jax.grad(loss_of, argnums=(0, 1, 2))(jnp.asarray(ro.rewards), jnp.asarray(ro.mask), jnp.asarray(ro.entropy))
    for name, g in zip(("rewards", "mask", "entropy"), grads, strict=True):
        assert np.all(np.asarray(g) == 0), name
    # ... while the policy's log-probs do get one (the check above is not vacuous).
    assert np.any(np.asarray(step(*(ro.rewards, ro.mask, ro.old_logp, ro.entropy, ro.ref_logp, ro.logp))[1]) != 0)
