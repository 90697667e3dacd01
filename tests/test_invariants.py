"""The invariants listed at the end of docs/algorithms.md ("Invariants"), one test (or more) each,
numbered as there; equation numbers are the paper's (arXiv 2508.04349 v6)."""

from dataclasses import replace as dataclass_replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rollouts import make_rollout

from gtpo_jax.losses import (
    RECIPES,
    LossConfig,
    grpo_advantages,
    grpo_s_advantages,
    gtpo_advantages,
    gtpo_token_rewards,
    mean_loss,
    prepare_batch,
)

# Every registered recipe at its defaults, plus the options that change the arithmetic.
VARIANTS = [dict(algorithm=a) for a in sorted(RECIPES)] + [
    dict(algorithm="gtpo", gtpo_norm="own_set"),
    dict(algorithm="gtpo", gtpo_norm="joint", norm_scope="batch"),
    dict(algorithm="gtpo", norm_scope="batch", kl_coef=0.1, kl_estimator="k1"),
    dict(algorithm="grpo_s", grpo_s_norm="joint", loss_agg="token_mean"),
    dict(algorithm="dapo", loss_agg="seq_mean_token_sum_norm", dual_clip=3.0, scale_rewards=False),
    dict(algorithm="grpo", loss_agg="seq_mean_token_sum_norm", norm_len=32),
]
IDS = ["-".join(f"{v}" for v in variant.values()) for variant in VARIANTS]


def loss_and_grad(cfg, ro, logp=None):
    def f(lp):
        batch, _ = prepare_batch(cfg, **ro.loss_inputs())
        return mean_loss(cfg, lp, batch)

    value, grad = jax.jit(jax.value_and_grad(f))(ro.logp if logp is None else logp)
    return np.asarray(value), np.asarray(grad)


def gtpo_all_modes(ro, **kw):
    for norm in ("paper", "own_set", "joint"):
        for scope in ("group", "batch"):
            yield (
                (norm, scope),
                np.asarray(gtpo_advantages(ro.rewards, ro.entropy, ro.mask, norm=norm, scope=scope, **kw)),
            )


# 1. Masked positions never change the loss or the gradient.
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_1_padding_garbage_changes_nothing(variant):
    ro = make_rollout(seed=1)
    cfg = LossConfig(group_size=ro.rewards.shape[1], **variant)
    value, grad = loss_and_grad(cfg, ro)
    value_g, grad_g = loss_and_grad(cfg, ro.with_garbage_padding())
    assert np.isfinite(value) and value != 0
    np.testing.assert_array_equal(value_g, value)
    np.testing.assert_array_equal(grad_g, grad)
    assert np.all(grad[ro.mask == 0] == 0)
    assert np.any(grad[ro.mask > 0] != 0)


# 2. alpha2 = 0 / beta2 = 0 reduce to the stated binary-reward advantages.
def test_2_gtpo_alpha2_zero_is_token_pooled_binary_advantage():
    ro = make_rollout(seed=2)
    adv = np.asarray(gtpo_advantages(ro.rewards, ro.entropy, ro.mask, alpha2=0.0))
    pos = (ro.rewards > 0.5)[..., None] & (ro.mask > 0)
    neg = (ro.rewards <= 0.5)[..., None] & (ro.mask > 0)
    p = pos.sum(axis=(1, 2)) / (ro.mask > 0).sum(axis=(1, 2))  # O+ share of the group's valid tokens
    expected = np.where(pos, np.sqrt((1 - p) / p)[:, None, None], 0) - np.where(
        neg, np.sqrt(p / (1 - p))[:, None, None], 0
    )
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["paper", "joint"])
def test_2_grpo_s_beta2_zero_is_grpo(norm):
    ro = make_rollout(seed=3)
    adv = np.asarray(grpo_s_advantages(ro.rewards, ro.entropy, ro.mask, beta2=0.0, norm=norm))
    grpo = np.asarray(grpo_advantages(ro.rewards, np.ones_like(ro.mask)))[..., 0]
    np.testing.assert_allclose(adv, grpo, rtol=1e-5, atol=1e-5)


# 3. Under gtpo_norm="paper", O+ tokens have A > 0 and O- tokens A < 0 ...
@pytest.mark.parametrize("seed", range(5))
def test_3_paper_norm_signs(seed):
    ro = make_rollout(seed=seed, P=6, G=8, T=16)
    pos = (ro.rewards > 0.5)[..., None] & (ro.mask > 0)
    neg = (ro.rewards <= 0.5)[..., None] & (ro.mask > 0)
    p = pos.sum(axis=(1, 2)) / (ro.mask > 0).sum(axis=(1, 2))
    inside = (p > 0.1 / 1.1) & (p < 1 / 1.1)  # the regime named in gtpo_advantages' docstring
    assert inside.sum() >= 4
    adv = np.asarray(gtpo_advantages(ro.rewards, ro.entropy, ro.mask, norm="paper"))[inside]
    assert np.all(adv[pos[inside]] > 0) and np.all(adv[neg[inside]] < 0)


def test_3_paper_norm_sign_needs_p_below_alpha1_share():
    # ... exactly while alpha2/(alpha1+alpha2) < p < alpha1/(alpha1+alpha2). Outside it the sign can
    # flip: two long correct answers (one with a near-zero-entropy token) and one 1-token wrong
    # answer give p = 20/21 > 1/1.1; mean R+ = 1.1 * 20/21 = 1.048 > r+ = 1 + 0.2 * 0.01/10.01.
    mask = np.zeros((1, 3, 10), np.float32)
    mask[0, :2, :] = 1
    mask[0, 2, 0] = 1
    entropy = np.ones((1, 3, 10), np.float32)
    entropy[0, 0, 0], entropy[0, 1, 0] = 0.01, 10.0
    adv = np.asarray(gtpo_advantages(np.array([[1.0, 1.0, 0.0]]), entropy, mask))
    assert adv[0, 0, 0] < 0


# 4. Conservation at alpha1 + alpha2 = 1 (binary rewards).
def test_4_conservation():
    ro = make_rollout(seed=4)
    shaped = np.asarray(gtpo_token_rewards(ro.rewards, ro.entropy, ro.mask, alpha1=0.7, alpha2=0.3))
    pos = (ro.rewards > 0.5)[..., None] * ro.mask
    neg = (ro.rewards <= 0.5)[..., None] * ro.mask
    np.testing.assert_allclose((shaped * pos).sum(axis=1), pos.sum(axis=1), rtol=1e-6, atol=1e-6)  # d_t
    np.testing.assert_allclose((shaped * neg).sum(axis=1), -neg.sum(axis=1), rtol=1e-6, atol=1e-6)  # -h_t
    # ... and not when alpha1 + alpha2 != 1 (so the test can tell): the defaults give 1.1 * d_t.
    shaped = np.asarray(gtpo_token_rewards(ro.rewards, ro.entropy, ro.mask))
    np.testing.assert_allclose((shaped * pos).sum(axis=1), 1.1 * pos.sum(axis=1), rtol=1e-6, atol=1e-6)


# 5. Permuting the responses of a group permutes the advantages the same way.
# In float64: the statement is exact, and float32 summation order would blur it at ~1e-6.
def test_5_permutation_equivariance():
    with jax.enable_x64(True):
        ro = make_rollout(seed=5, dtype=np.float64)
        perm = np.random.default_rng(0).permutation(ro.rewards.shape[1])
        permuted = dataclass_replace(ro, **{k: getattr(ro, k)[:, perm] for k in ("rewards", "mask", "entropy")})
        tol = dict(rtol=1e-10, atol=1e-12)
        permuted_gtpo = dict(gtpo_all_modes(permuted))
        for mode, adv in gtpo_all_modes(ro):
            assert np.any(adv[:, perm] != adv)  # the permutation does move something
            np.testing.assert_allclose(permuted_gtpo[mode], adv[:, perm], **tol, err_msg=str(mode))
        for norm in ("paper", "joint"):
            adv = np.asarray(grpo_s_advantages(ro.rewards, ro.entropy, ro.mask, norm=norm))
            other = np.asarray(grpo_s_advantages(permuted.rewards, permuted.entropy, permuted.mask, norm=norm))
            np.testing.assert_allclose(other, adv[:, perm], **tol)
        adv = np.asarray(grpo_advantages(ro.rewards, ro.mask))
        np.testing.assert_allclose(np.asarray(grpo_advantages(permuted.rewards, permuted.mask)), adv[:, perm], **tol)


# 6. Uniform entropy across alive responses: every O+ token at t gets the same shaped reward.
def test_6_uniform_entropy_gives_uniform_reward():
    ro = make_rollout(seed=6)
    entropy = np.full_like(ro.entropy, 1.7)
    shaped = np.asarray(gtpo_token_rewards(ro.rewards, entropy, ro.mask))
    pos = (ro.rewards > 0.5)[..., None] & (ro.mask > 0)
    neg = (ro.rewards <= 0.5)[..., None] & (ro.mask > 0)
    np.testing.assert_allclose(shaped[pos], 1.1, rtol=1e-6)  # alpha1 * 1 + alpha2 * d_t * H / (d_t * H)
    np.testing.assert_allclose(shaped[neg], -1.1, rtol=1e-6)


# 7. Higher entropy never earns less reward on O+; lower entropy never earns less penalty on O-.
def test_7_entropy_monotonicity():
    ro = make_rollout(seed=7, P=3, G=8, T=12)
    pos = (ro.rewards > 0.5)[..., None] & (ro.mask > 0)
    neg = (ro.rewards <= 0.5)[..., None] & (ro.mask > 0)
    checked = 0
    for mode, adv in gtpo_all_modes(ro):
        for p in range(adv.shape[0]):
            for t in range(adv.shape[2]):
                for sel, sign in ((pos, 1), (neg, 1)):
                    rows = np.flatnonzero(sel[p, :, t])
                    h, a = ro.entropy[p, rows, t], adv[p, rows, t]
                    order = np.argsort(h)
                    # O+: A grows with H (more reward). O-: A grows with H, i.e. the penalty -A
                    # grows as H falls: confident wrong tokens are punished hardest.
                    assert np.all(sign * np.diff(a[order]) >= -1e-6), (mode, p, t)
                    checked += len(rows) > 1
    assert checked > 50


# 8. Zero entropy, a single response alive, an all-padding response, G = 1: finite results.
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_8_degenerate_inputs_are_finite(variant):
    ro = make_rollout(seed=8, G=4)
    ro.entropy[:] = 0.0  # zero entropy everywhere
    ro.mask[1, 1:] = 0.0  # prompt 1: only response 0 alive ...
    ro.mask[2, :] = 0.0  # prompt 2: every response all padding
    cfg = LossConfig(group_size=4, **variant)
    value, grad = loss_and_grad(cfg, ro)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    for _, adv in gtpo_all_modes(ro):
        assert np.all(np.isfinite(adv))

    # G = 1: every built-in recipe is group-relative, so the config refuses it ...
    assert cfg.recipe.group_relative
    with pytest.raises(ValueError, match="group_size"):
        LossConfig(group_size=1, **variant)
    single = make_rollout(seed=8, G=1, mixed=False)
    # ... while the advantage functions accept it and give exactly 0 (nothing to compare with).
    assert np.all(np.asarray(grpo_advantages(single.rewards, single.mask)) == 0)
    for _, adv in gtpo_all_modes(single):
        assert np.all(adv == 0)
    assert np.all(np.asarray(grpo_s_advantages(single.rewards, single.entropy, single.mask)) == 0)


# A group whose rewards are all equal gives zero advantage, for every estimator.
@pytest.mark.parametrize("value", [0.0, 1.0, 0.3])
def test_equal_rewards_give_zero_advantage(value):
    ro = make_rollout(seed=9)
    rewards = np.full_like(ro.rewards, value)
    assert np.all(np.asarray(grpo_advantages(rewards, ro.mask)) == 0)
    assert np.all(np.asarray(grpo_advantages(rewards, ro.mask, scale_rewards=False)) == 0)
    for _, adv in gtpo_all_modes(dataclass_replace(ro, rewards=rewards)):
        assert np.all(adv == 0)
    assert np.all(np.asarray(grpo_s_advantages(rewards, ro.entropy, ro.mask)) == 0)


# 9. The gradient matches central finite differences of the loss, in float64.
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_9_gradient_matches_finite_differences(variant):
    with jax.enable_x64(True):
        ro = make_rollout(seed=10, P=2, G=4, T=5, dtype=np.float64, log_ratio_scale=0.4)
        cfg = LossConfig(group_size=4, **variant)
        batch, _ = prepare_batch(cfg, **ro.loss_inputs())
        _assert_away_from_kinks(ro, cfg)
        f = jax.jit(lambda lp: mean_loss(cfg, lp, batch))
        grad = np.asarray(jax.grad(f)(jnp.asarray(ro.logp)))
        assert grad.dtype == np.float64
        h = 1e-6
        fd = np.zeros_like(ro.logp)
        for idx in np.ndindex(ro.logp.shape):
            up, down = ro.logp.copy(), ro.logp.copy()
            up[idx] += h
            down[idx] -= h
            fd[idx] = (float(f(up)) - float(f(down))) / (2 * h)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)
        assert np.abs(grad).max() > 1e-3


def _assert_away_from_kinks(ro, cfg):
    """Finite differences are only valid where the clip is smooth: keep ratios off its edges."""
    ratio = np.exp(ro.logp - ro.old_logp)
    seq = (ratio * ro.mask).sum(-1) / np.maximum(ro.mask.sum(-1), 1)
    geo = np.exp(((ro.logp - ro.old_logp) * ro.mask).sum(-1) / np.maximum(ro.mask.sum(-1), 1))  # GSPO
    edges = [1 - cfg.eps_low, 1 + cfg.eps_high] + ([cfg.dual_clip] if cfg.dual_clip else [])
    for r in (ratio[ro.mask > 0], seq, geo):
        # A step h = 1e-6 of one log-prob moves a ratio by ~ratio * h: 1e-5 is far enough (GSPO's
        # clip edges, 1 - 3e-4 and 1 + 4e-4, are too close together for a wider margin).
        assert np.min(np.abs(r[..., None] - np.array(edges))) > 1e-5
