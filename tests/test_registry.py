"""Recipes, the validated config, reward shaping and dynamic sampling on the loss side."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rollouts import make_rollout

from gtpo_jax.losses import (
    RECIPES,
    ConfigError,
    GTPONorm,
    LossAgg,
    LossConfig,
    RatioLevel,
    Recipe,
    compute_loss,
    finalize_diagnostics,
    gtpo_advantages,
    informative_groups,
    mean_loss,
    overlong_penalty,
    prepare_batch,
    register,
)


def test_recipe_defaults():
    grpo, dapo, gtpo, grpo_s = (LossConfig(algorithm=a) for a in ("grpo", "dapo", "gtpo", "grpo_s"))
    assert (grpo.eps_low, grpo.eps_high, grpo.loss_agg, grpo.kl_coef) == (0.2, 0.2, "seq_mean_token_mean", 0.04)
    assert not grpo.dynamic_sampling
    for cfg in (dapo, gtpo, grpo_s):
        assert (cfg.eps_low, cfg.eps_high, cfg.kl_coef, cfg.dynamic_sampling) == (0.2, 0.28, 0.0, True)
    assert dapo.loss_agg == gtpo.loss_agg == LossAgg.TOKEN_MEAN
    assert grpo_s.loss_agg == LossAgg.SEQ_MEAN_TOKEN_MEAN and grpo_s.recipe.ratio_level is RatioLevel.SEQUENCE
    assert (gtpo.alpha1, gtpo.alpha2, gtpo.gtpo_norm, gtpo.norm_scope) == (1.0, 0.1, "paper", "group")
    assert (grpo_s.beta1, grpo_s.beta2, grpo_s.grpo_s_norm) == (1.0, 0.1, "paper")
    assert LossConfig().algorithm == "gtpo"
    # An explicit value beats the recipe default; the config is frozen and hashable (jit static arg).
    assert LossConfig(algorithm="grpo", eps_high=0.3).eps_high == 0.3
    with pytest.raises(dataclasses.FrozenInstanceError):
        gtpo.eps_high = 1.0
    assert hash(gtpo) == hash(LossConfig(algorithm="gtpo"))


def test_plain_strings_equal_enum_members():
    assert LossConfig(loss_agg="token_mean") == LossConfig(loss_agg=LossAgg.TOKEN_MEAN)
    assert isinstance(LossConfig(gtpo_norm="joint").gtpo_norm, GTPONorm)
    ro = make_rollout(seed=20)
    a = gtpo_advantages(ro.rewards, ro.entropy, ro.mask, norm="own_set", scope="batch")
    b = gtpo_advantages(ro.rewards, ro.entropy, ro.mask, norm=GTPONorm.OWN_SET, scope="batch")
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"norm='papr'.*'paper', 'own_set', 'joint'"):
        gtpo_advantages(ro.rewards, ro.entropy, ro.mask, norm="papr")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(eps_high=-0.1), r"loss\.eps_high=-0\.1: must be >= 0"),
        (dict(eps_low=1.0), r"loss\.eps_low=1\.0"),
        (dict(group_size=1), r"loss\.group_size=1: gtpo compares responses within a group and needs group_size >= 2"),
        (dict(alpha2=-0.5), r"loss\.alpha2=-0\.5: must be >= 0"),
        (dict(beta2=-1.0), r"loss\.beta2"),
        (dict(kl_coef=-1.0), r"loss\.kl_coef"),
        (dict(dual_clip=0.5), r"loss\.dual_clip=0\.5: must be > 1"),
        (dict(eps=0.0), r"loss\.eps=0\.0"),
        (dict(algorithm="gtpoo"), r"unknown loss\.algorithm='gtpoo'; did you mean 'gtpo'\?"),
        (dict(loss_agg="mean"), r"loss\.loss_agg='mean' is not a valid choice"),
        (dict(overlong_buffer_len=512, max_response_len=256), r"loss\.overlong_buffer_len=512"),
        (dict(overlong_buffer_len=512), r"max_response_len \(= 0\)"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LossConfig(**kwargs)


def test_from_dict_rejects_unknown_fields_with_a_suggestion():
    cfg = LossConfig.from_dict({"algorithm": "dapo", "eps_high": 0.3})
    assert cfg == LossConfig(algorithm="dapo", eps_high=0.3)
    with pytest.raises(ConfigError, match=r"unknown field loss\.eps_hihg; did you mean 'eps_high'\?"):
        LossConfig.from_dict({"eps_hihg": 0.3})


def test_adding_an_algorithm_is_one_function_and_one_entry():
    # RLOO: leave-one-out baseline, A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean r).
    def rloo(cfg, x):
        G = x.rewards.shape[-1]
        return (G / (G - 1) * (x.rewards - x.rewards.mean(-1, keepdims=True)))[..., None] * x.mask

    register(Recipe("rloo", rloo, RatioLevel.TOKEN, True, dict(RECIPES["dapo"].defaults), "RLOO test recipe"))
    try:
        cfg = LossConfig(algorithm="rloo", group_size=4)
        rewards = np.array([[1.0, 0.0, 0.0, 0.0]])
        mask = np.ones((1, 4, 3), np.float32)
        batch, _ = prepare_batch(cfg, rewards=rewards, mask=mask, old_logp=np.zeros_like(mask), entropy=mask)
        # A_0 = 1 - 0 = 1, A_j = 0 - 1/3 for the others.
        np.testing.assert_allclose(batch.advantages[0, :, 0], [1.0, -1 / 3, -1 / 3, -1 / 3], rtol=1e-6)
        assert np.isfinite(mean_loss(cfg, jnp.zeros_like(mask), batch))
    finally:
        del RECIPES["rloo"]
    with pytest.raises(ValueError, match="missing"):
        register(Recipe("broken", rloo, RatioLevel.TOKEN, True, {"eps_low": 0.2}, "incomplete defaults"))


def test_overlong_penalty_golden():
    # max_len 10, buffer 4: free up to 6 tokens, then -(L - 6)/4, -1 at 10 and beyond.
    lengths = np.array([[3, 6, 7, 8, 10, 12]])
    np.testing.assert_allclose(
        overlong_penalty(lengths, max_len=10, buffer_len=4), [[0, 0, -0.25, -0.5, -1, -1]], atol=1e-7
    )
    np.testing.assert_allclose(overlong_penalty(lengths, max_len=10, buffer_len=4, penalty=0.5)[0, 3], -0.25)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, max_len=10, buffer_len=0)
    with pytest.raises(ValueError, match="must not exceed max_len"):
        overlong_penalty(lengths, max_len=10, buffer_len=11)


def test_informative_groups_decide_on_correctness_not_shaped_reward():
    rewards = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.9, 0.7, 0.6]])
    np.testing.assert_array_equal(informative_groups(rewards), [True, False, False, False])
    np.testing.assert_array_equal(informative_groups(rewards, success_threshold=0.65), [True, False, False, True])


def _mask(lengths, T):
    return (np.arange(T)[None, None, :] < np.asarray(lengths)[..., None]).astype(np.float32)


def test_overlong_shaping_keeps_success_on_the_verifier_reward():
    cfg = LossConfig(algorithm="dapo", group_size=3, overlong_buffer_len=4, max_response_len=8)
    lengths = np.array([[8, 2, 6]])  # 8 = limit: full penalty; 6: -(6 - 4)/4 = -0.5
    rewards = np.array([[1.0, 0.0, 1.0]])
    mask = _mask(lengths, 8)
    batch, diag = prepare_batch(cfg, rewards=rewards, mask=mask, old_logp=mask * 0, entropy=mask, lengths=lengths)
    np.testing.assert_array_equal(batch.correct, [[True, False, True]])  # 1 - 1 = 0 is still a success
    d = finalize_diagnostics(diag)
    np.testing.assert_allclose(d["shaped_reward_mean"], (0.0 + 0.0 + 0.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(d["pass_rate"], 2 / 3, rtol=1e-6)
    # GRPO advantages of the shaped rewards [0, 0, 0.5]: mean 1/6, std sqrt(1/18).
    std = np.sqrt(((1 / 6) ** 2 * 2 + (1 / 3) ** 2) / 3)
    np.testing.assert_allclose(batch.advantages[0, :, 0], np.array([-1 / 6, -1 / 6, 1 / 3]) / (std + 1e-6), rtol=1e-5)
    with pytest.raises(ValueError, match="lengths"):
        prepare_batch(cfg, rewards=rewards, mask=mask, old_logp=mask * 0, entropy=mask)


def test_mask_truncated_removes_truncated_responses_from_the_loss():
    cfg = LossConfig(algorithm="dapo", group_size=3, mask_truncated=True, max_response_len=8)
    lengths = np.array([[8, 2, 5]])
    mask = _mask(lengths, 8)
    batch, _ = prepare_batch(
        cfg, rewards=np.array([[1.0, 0.0, 1.0]]), mask=mask, old_logp=mask * 0, entropy=mask, lengths=lengths
    )
    assert np.all(batch.mask[0, 0] == 0) and batch.mask[0, 1].sum() == 2 and batch.mask[0, 2].sum() == 5
    # An explicit `truncated` flag wins over the length rule (the group stays informative).
    batch, _ = prepare_batch(
        cfg, rewards=np.array([[1.0, 0.0, 0.0]]), mask=mask, old_logp=mask * 0, entropy=mask,
        lengths=lengths, truncated=np.array([[False, True, False]]),
    )  # fmt: skip
    assert batch.mask[0, 0].sum() == 8 and batch.mask[0, 1].sum() == 0


@pytest.mark.parametrize(("algorithm", "drops"), [("dapo", True), ("grpo", False)])
def test_dynamic_sampling_removes_uninformative_groups_from_numerator_and_denominator(algorithm, drops):
    ro = make_rollout(seed=21, P=3)
    ro.rewards[2] = 1.0  # prompt 2: all correct -> uninformative
    cfg = LossConfig(algorithm=algorithm, group_size=6, kl_coef=0.0, loss_agg="token_mean")
    batch, diag = prepare_batch(cfg, **ro.loss_inputs(ref=False))
    out = compute_loss(cfg, jnp.asarray(ro.logp), batch)
    tokens_all, tokens_informative = ro.mask.sum(), ro.mask[:2].sum()
    assert float(out.denominator) == (tokens_informative if drops else tokens_all)
    np.testing.assert_allclose(finalize_diagnostics(diag)["informative_frac"], 2 / 3, rtol=1e-6)
    # The uninformative group's log-probs do not move the loss either way (its advantage is 0) ...
    grad = jax.grad(lambda lp: compute_loss(cfg, lp, batch).loss_sum)(jnp.asarray(ro.logp))
    assert np.all(np.asarray(grad)[2] == 0)


def test_group_size_must_match_the_rewards():
    ro = make_rollout(seed=22)
    with pytest.raises(ValueError, match=r"G = loss\.group_size = 8; got \(4, 6\)"):
        prepare_batch(LossConfig(group_size=8), **ro.loss_inputs(ref=False))
