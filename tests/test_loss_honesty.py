"""Loss-side guarantees that a run cannot go wrong silently (issue "Every run honest"):
the overlong penalty reaches wrong answers, invalid and truncated responses leave their group,
wrong-sign fractions and the size of the shaping are reported, and every knob is live or refused
(docs/algorithms.md: "The overlong penalty", "When the paper norm flips a sign").

Every test iterates over the registered recipes (`RECIPES`), not over a hand-kept list."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rollouts import make_rollout

from gtpo_jax.losses import RECIPES, ConfigError, LossConfig, finalize_diagnostics, mean_loss, prepare_batch

RECIPE_NAMES = sorted(RECIPES)


def _prepare(cfg, rewards, lengths, T, *, entropy=None, valid=None):
    lengths = np.asarray(lengths)
    mask = (np.arange(T)[None, None, :] < lengths[..., None]).astype(np.float32)
    entropy = np.ones_like(mask) if entropy is None else entropy
    return prepare_batch(
        cfg,
        rewards=np.asarray(rewards, np.float32),
        mask=mask,
        old_logp=mask * 0 - 1.0,
        entropy=entropy,
        lengths=lengths,
        valid=None if valid is None else np.asarray(valid),
        ref_logp=mask * 0 - 1.0,
    )


def _mean_advantage(batch, p, i):
    """Token-mean advantage of response i of prompt p (a sequence advantage is its own mean)."""
    adv = np.asarray(batch.advantages)
    if adv.ndim == 2:
        return float(adv[p, i])
    m = np.asarray(batch.mask)[p, i]
    return float((adv[p, i] * m).sum() / m.sum())


# ---- 1. The overlong penalty lowers wrong answers too --------------------------------------
@pytest.mark.parametrize("algorithm", RECIPE_NAMES)
def test_longer_wrong_response_in_the_buffer_gets_a_lower_advantage(algorithm):
    # max_len 10, buffer 4: response 2 (9 tokens) pays 0.75, response 1 (5 tokens) nothing.
    cfg = LossConfig(algorithm=algorithm, group_size=4, overlong_buffer_len=4, max_response_len=10)
    batch, _ = _prepare(cfg, [[1, 0, 0, 1]], [[4, 5, 9, 6]], 10)
    assert _mean_advantage(batch, 0, 2) < _mean_advantage(batch, 0, 1) - 1e-3
    # and a longer correct one as before: response 3 (6 tokens) is free, so compare with 7.
    batch, _ = _prepare(cfg, [[1, 0, 0, 1]], [[4, 5, 5, 8]], 10)
    assert _mean_advantage(batch, 0, 3) < _mean_advantage(batch, 0, 0) - 1e-3


def test_gtpo_penalty_enters_eq5_as_alpha1_times_minus_one_plus_penalty():
    # Uniform entropy: r- = alpha1 * (-1 + pen_j) - alpha2 on every token, whatever h_t.
    from gtpo_jax.losses.advantages import gtpo_token_rewards_from_sets

    correct = np.array([[True, False, False]])
    mask = np.ones((1, 3, 2), np.float32)
    shaped = gtpo_token_rewards_from_sets(
        np.array([[1.0, 0.0, 0.0]]),
        correct,
        mask,
        mask,
        alpha1=2.0,
        alpha2=0.5,
        eps=0.0,
        penalty=np.array([[-0.25, 0.0, -0.5]]),
    )
    np.testing.assert_allclose(shaped[0, :, 0], [2 * 0.75 + 0.5, -2 - 0.5, 2 * -1.5 - 0.5], rtol=1e-6)


# ---- 4c / 6. Invalid and truncated responses leave their group ---------------------------
def _without(x, i):
    return np.delete(np.asarray(x), i, axis=1)


@pytest.mark.parametrize("algorithm", RECIPE_NAMES)
def test_invalid_response_is_excluded_as_if_it_had_not_been_sampled(algorithm):
    ro = make_rollout(seed=3, P=3, G=5, T=7, empty_response=False)
    ro.rewards[:, 4] = 0.0  # the failure score: counting it as wrong would change the statistics
    valid = np.ones((3, 5), bool)
    valid[:, 4] = False
    cfg5 = LossConfig(algorithm=algorithm, group_size=5)
    cfg4 = LossConfig(algorithm=algorithm, group_size=4)
    kw = dict(old_logp=ro.old_logp, entropy=ro.entropy, ref_logp=ro.ref_logp)
    b5, d5 = prepare_batch(cfg5, rewards=ro.rewards, mask=ro.mask, valid=valid, **kw)
    b4, _ = prepare_batch(
        cfg4, rewards=_without(ro.rewards, 4), mask=_without(ro.mask, 4), **{k: _without(v, 4) for k, v in kw.items()}
    )
    np.testing.assert_allclose(_without(b5.advantages, 4), b4.advantages, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(b5.mask)[:, 4] == 0) and np.all(np.asarray(b5.advantages)[:, 4] == 0)
    loss5 = mean_loss(cfg5, jnp.asarray(ro.logp), b5)
    loss4 = mean_loss(cfg4, jnp.asarray(_without(ro.logp, 4)), b4)
    np.testing.assert_allclose(loss5, loss4, rtol=1e-5)
    assert finalize_diagnostics(d5)["valid_frac"] == pytest.approx(0.8)


@pytest.mark.parametrize("algorithm", RECIPE_NAMES)
def test_mask_truncated_decides_the_sets_on_the_responses_that_remain(algorithm):
    # Response 4 of each group reaches the limit and is masked: O+/O- and every statistic must
    # be those of the other four. It is correct in group 0 (so it would have been in O+).
    ro = make_rollout(seed=4, P=3, G=5, T=7, empty_response=False)
    ro.lengths[:, :4] = np.minimum(ro.lengths[:, :4], 6)
    ro.lengths[:, 4] = 7
    ro.rewards[0, 4] = 1.0
    mask = (np.arange(7)[None, None, :] < ro.lengths[..., None]).astype(np.float32)
    kw = dict(old_logp=ro.old_logp, entropy=ro.entropy, ref_logp=ro.ref_logp)
    b5, _ = prepare_batch(
        LossConfig(algorithm=algorithm, group_size=5, mask_truncated=True, max_response_len=7),
        rewards=ro.rewards,
        mask=mask,
        lengths=ro.lengths,
        **kw,
    )
    b4, _ = prepare_batch(
        LossConfig(algorithm=algorithm, group_size=4),
        rewards=_without(ro.rewards, 4),
        mask=_without(mask, 4),
        **{k: _without(v, 4) for k, v in kw.items()},
    )
    np.testing.assert_allclose(_without(b5.advantages, 4), b4.advantages, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(b5.advantages)[:, 4] == 0)


# ---- 8. Wrong-sign fractions and "shaping is live" ------------------------------------------
def _sign_case(n_correct, G=16, T=6, seed=0):
    rng = np.random.default_rng(seed)
    rewards = np.zeros((1, G), np.float32)
    rewards[0, :n_correct] = 1.0
    lengths = rng.integers(3, T + 1, size=(1, G))
    lengths[0, :n_correct] = 2 if n_correct < G // 2 else lengths[0, :n_correct]  # a clear minority set
    lengths[0, n_correct:] = 2 if n_correct > G // 2 else lengths[0, n_correct:]
    entropy = rng.uniform(0.05, 3.0, (1, G, T)).astype(np.float32)
    return rewards, lengths, entropy, T


@pytest.mark.parametrize("algorithm", RECIPE_NAMES)
@pytest.mark.parametrize("n_correct", [1, 8, 15])
def test_wrong_sign_fractions_are_reported_exactly(algorithm, n_correct):
    rewards, lengths, entropy, T = _sign_case(n_correct)
    cfg = LossConfig(algorithm=algorithm, group_size=16)
    batch, diag = _prepare(cfg, rewards, lengths, T, entropy=entropy)
    d = finalize_diagnostics(diag)
    adv = np.asarray(batch.advantages)
    adv = adv if adv.ndim == 3 else np.broadcast_to(adv[..., None], batch.mask.shape)
    m = np.asarray(batch.mask) > 0
    pos = m & (rewards[..., None] > 0.5)
    neg = m & (rewards[..., None] <= 0.5)
    assert d["wrong_sign_pos"] == pytest.approx((adv[pos] < 0).mean())
    assert d["wrong_sign_neg"] == pytest.approx((adv[neg] > 0).mean())
    if algorithm == "gtpo":  # the paper norm: inside (1/11, 10/11) no sign is wrong, outside some are
        inside = 1 / 11 < pos.sum() / m.sum() < 10 / 11
        assert (d["wrong_sign_pos"] + d["wrong_sign_neg"] == 0) == inside
        assert n_correct == 8 or not inside


@pytest.mark.parametrize("algorithm", [n for n in RECIPE_NAMES if getattr(RECIPES[n], "unshaped", None)])
def test_shaping_delta_is_the_mean_distance_to_the_unshaped_advantage(algorithm):
    rewards, lengths, entropy, T = _sign_case(5)
    knob = {"gtpo": "alpha2", "grpo_s": "beta2"}.get(algorithm)
    cfg = LossConfig(algorithm=algorithm, group_size=16)
    batch, diag = _prepare(cfg, rewards, lengths, T, entropy=entropy)
    off = LossConfig(algorithm=algorithm, group_size=16, **({knob: 0.0} if knob else {}))
    unshaped, diag_off = _prepare(off, rewards, lengths, T, entropy=entropy)
    a, b = (np.asarray(x.advantages) for x in (batch, unshaped))
    a, b = (x if x.ndim == 3 else np.broadcast_to(x[..., None], batch.mask.shape) for x in (a, b))
    m = np.asarray(batch.mask) > 0
    expected = np.abs(a - b)[m].mean()
    assert expected > 1e-3
    assert finalize_diagnostics(diag)["shaping_delta"] == pytest.approx(expected, rel=1e-5)
    assert finalize_diagnostics(diag_off)["shaping_delta"] == pytest.approx(0.0, abs=1e-6)


# ---- 9. Every knob is live, and none is silently ignored -----------------------------------
T9 = 8
# field -> (context it applies in, the value to change it to given the resolved default, or a
# dict of fields to change together).
# group_size is structural (it must equal the batch's G) and checked by prepare_batch's shape check.
PERTURB = {
    "eps_low": ({}, lambda d: 0.05),
    "eps_high": ({}, lambda d: 0.05),
    "dual_clip": ({}, lambda d: 1.01),  # near 1: binds on GSPO's length-averaged ratios too
    "kl_coef": ({}, lambda d: 0.0 if d else 0.3),
    "kl_estimator": ({"kl_coef": 0.3}, lambda d: "k1"),
    "loss_agg": ({}, lambda d: "token_mean" if d == "seq_mean_token_sum_norm" else "seq_mean_token_sum_norm"),
    "norm_len": ({"loss_agg": "seq_mean_token_sum_norm"}, lambda d: 3),
    "success_threshold": ({}, lambda d: -0.5),
    "eps": ({}, lambda d: 0.5),
    "dynamic_sampling": ({}, lambda d: not d),
    "overlong_buffer_len": ({}, lambda d: {"overlong_buffer_len": 4, "max_response_len": T9}),
    "overlong_penalty": ({"max_response_len": T9, "overlong_buffer_len": 4}, lambda d: 0.3),
    "max_response_len": ({"max_response_len": T9, "overlong_buffer_len": 4}, lambda d: T9 + 3),
    "mask_truncated": ({}, lambda d: {"mask_truncated": not d, "max_response_len": T9}),
    "scale_rewards": ({}, lambda d: not d),
    "alpha1": ({}, lambda d: 0.5),
    "alpha2": ({}, lambda d: 0.6),
    "gtpo_norm": ({}, lambda d: "joint"),
    "norm_scope": ({}, lambda d: "batch"),
    "beta1": ({}, lambda d: 0.5),
    "beta2": ({}, lambda d: 0.6),
    "grpo_s_norm": ({}, lambda d: "joint"),
}
STRUCTURAL = {"group_size"}
# Without dynamic sampling the success threshold decides only what is reported (pass rate, the
# sets' entropies, evaluation): for it a change of the diagnostics counts.
REPORTED = {"success_threshold"}


def _knob_batch():
    ro = make_rollout(seed=5, P=3, G=4, T=T9, log_ratio_scale=1.0)
    ro.rewards[2] = 1.0  # one uninformative group (dynamic sampling)
    ro.lengths[:, 0] = T9  # truncated responses (mask_truncated) in the overlong buffer
    ro.mask = (np.arange(T9)[None, None, :] < ro.lengths[..., None]).astype(np.float32)
    ro.rewards[1] = [0.7, 0.2, 0.9, 0.0]  # non-binary rewards: the reward std is not the set size's
    return ro


def _loss_and_grad(cfg, ro):
    batch, diag = prepare_batch(cfg, lengths=ro.lengths, **ro.loss_inputs())
    loss, grad = jax.value_and_grad(lambda lp: mean_loss(cfg, lp, batch))(jnp.asarray(ro.logp))
    return loss, grad, finalize_diagnostics(diag)["pass_rate"]


def test_every_loss_field_is_read_by_some_recipe_and_has_a_liveness_check():
    fields = {f.name for f in dataclasses.fields(LossConfig)} - {"algorithm"}
    assert set().union(*(r.reads for r in RECIPES.values())) == fields
    for recipe in RECIPES.values():
        assert recipe.reads - STRUCTURAL <= set(PERTURB), f"{recipe.name}: no liveness check for a field it reads"


@pytest.mark.parametrize("algorithm", RECIPE_NAMES)
def test_each_field_a_recipe_reads_changes_its_loss_or_gradient(algorithm):
    ro = _knob_batch()
    for field in sorted(RECIPES[algorithm].reads - STRUCTURAL):
        context, change = PERTURB[field]
        base = LossConfig(algorithm=algorithm, group_size=4, **context)
        new = change(getattr(base, field))
        changed = LossConfig(
            algorithm=algorithm, group_size=4, **{**context, **(new if isinstance(new, dict) else {field: new})}
        )
        (l0, g0, p0), (l1, g1, p1) = _loss_and_grad(base, ro), _loss_and_grad(changed, ro)
        same = np.allclose(l0, l1, rtol=1e-6, atol=1e-9) and np.allclose(g0, g1, rtol=1e-6, atol=1e-9)
        assert not (same and (field not in REPORTED or p0 == p1)), (
            f"{algorithm}: loss.{field} {getattr(base, field)!r} -> {getattr(changed, field)!r} changes nothing"
        )


@pytest.mark.parametrize("algorithm", RECIPE_NAMES)
def test_setting_a_field_the_algorithm_does_not_read_is_an_error(algorithm):
    fields = {f.name for f in dataclasses.fields(LossConfig)} - {"algorithm"}
    for field in sorted(fields - RECIPES[algorithm].reads):
        with pytest.raises(ConfigError, match=rf"loss\.{field}=.*not read by algorithm '{algorithm}'"):
            new = PERTURB[field][1](None)
            LossConfig(algorithm=algorithm, **(new if isinstance(new, dict) else {field: new}))
        assert getattr(LossConfig(algorithm=algorithm), field) is None  # resolved as "does not apply"
    # Fields read only in a context are refused outside it.
    for field, context_free in [
        ("kl_estimator", {"kl_coef": 0.0}),
        ("norm_len", {"loss_agg": "token_mean"}),
        ("overlong_penalty", {}),
        ("max_response_len", {}),
    ]:
        with pytest.raises(ConfigError, match=rf"loss\.{field}=.*not read by algorithm '{algorithm}' with"):
            LossConfig(algorithm=algorithm, **context_free, **{field: PERTURB[field][1](None)})


def test_pass_rate_counts_a_truncated_correct_answer_as_correct():
    cfg = LossConfig(algorithm="dapo", group_size=3, mask_truncated=True, max_response_len=4)
    _, diag = _prepare(cfg, [[1, 0, 1]], [[4, 2, 3]], 4)  # response 0 is truncated and correct
    assert finalize_diagnostics(diag)["pass_rate"] == pytest.approx(2 / 3)
