"""The presets RLOO, Dr. GRPO and GSPO (`gtpo_jax/losses/variants.py`): golden values derived by
hand in the comments, never from the code under test, and their published defaults.

The registry-driven checks (invariants, liveness, invalid responses, overlong penalty) take
these recipes from `RECIPES` like the built-in ones: tests/test_invariants.py and
tests/test_loss_honesty.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gtpo_jax.losses import ConfigError, LossConfig, RatioLevel, mean_loss, policy_loss, prepare_batch, rloo_advantages
from gtpo_jax.losses.policy_loss import sequence_geometric_ratios, sequence_ratios

S2 = np.sqrt(2.0)


def _mask(lengths, T):
    return (np.arange(T)[None, None, :] < np.asarray(lengths)[..., None]).astype(np.float32)


def _on_policy_batch(cfg, rewards, lengths, T, valid=None):
    mask = _mask(lengths, T)
    old = np.full_like(mask, -1.0)
    batch, _ = prepare_batch(
        cfg, rewards=np.asarray(rewards, np.float32), mask=mask, old_logp=old, entropy=np.ones_like(mask), valid=valid
    )
    return batch, jnp.asarray(old), mask


def test_published_defaults():
    rloo, dr, gspo = (LossConfig(algorithm=a) for a in ("rloo", "dr_grpo", "gspo"))
    for cfg in (rloo, dr):
        assert (cfg.eps_low, cfg.eps_high, cfg.loss_agg, cfg.norm_len) == (0.2, 0.2, "seq_mean_token_sum_norm", 0)
        assert cfg.recipe.ratio_level is RatioLevel.TOKEN
        assert cfg.scale_rewards is None  # neither scales by the std: the knob is not theirs
    assert (gspo.eps_low, gspo.eps_high, gspo.loss_agg, gspo.scale_rewards) == (3e-4, 4e-4, "seq_mean_token_mean", True)
    assert gspo.recipe.ratio_level is RatioLevel.SEQUENCE_GEOMETRIC
    for cfg in (rloo, dr, gspo):
        assert (cfg.kl_coef, cfg.dynamic_sampling) == (0.0, False)
        assert "arXiv" in cfg.recipe.doc and "arXiv" in cfg.recipe.advantages.__doc__
    with pytest.raises(ConfigError, match=r"loss\.scale_rewards=True is not read by algorithm 'dr_grpo'"):
        LossConfig(algorithm="dr_grpo", scale_rewards=True)


# ---- RLOO ------------------------------------------------------------------------------------
def test_rloo_golden():
    # Prompt A, r = [1, 0, 0, 1]: A_i = r_i - (sum r - r_i)/3:
    #   A_0 = 1 - (0+0+1)/3 = 2/3, A_1 = 0 - (1+0+1)/3 = -2/3, A_2 = -2/3, A_3 = 2/3
    #   (= G/(G-1) (r_i - mean) = 4/3 * (+-0.5)).
    # Prompt B, r = [0.5, 1, 0, 0.3] with response 3 invalid (its reward errored): n = 3,
    #   A_0 = 0.5 - (1+0)/2 = 0, A_1 = 1 - (0.5+0)/2 = 0.75, A_2 = 0 - (0.5+1)/2 = -0.75, A_3 = 0.
    # Prompt C, r = [1, 1, 1, 0] with only response 0 valid: nobody to leave out -> all 0.
    rewards = np.array([[1.0, 0, 0, 1], [0.5, 1, 0, 0.3], [1, 1, 1, 0]], np.float32)
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]], bool)
    lengths = np.array([[3, 2, 1, 3], [1, 3, 2, 2], [2, 2, 2, 2]])
    mask = _mask(lengths, 3)
    expected = np.array([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0, 0.75, -0.75, 0], [0, 0, 0, 0]])
    adv = np.asarray(rloo_advantages(rewards, mask, valid=valid))
    np.testing.assert_allclose(adv, expected[..., None] * mask, atol=1e-7)
    # Through the recipe (prompt C is uninformative; without dynamic sampling it stays, at 0).
    batch, _, _ = _on_policy_batch(LossConfig(algorithm="rloo", group_size=4), rewards, lengths, 3, valid=valid)
    np.testing.assert_allclose(batch.advantages, expected[..., None] * mask, atol=1e-7)


def test_rloo_includes_the_overlong_penalty():
    # r + penalty = [1 - 0.5, 0, 0] = [0.5, 0, 0]: A = [0.5 - 0, 0 - 0.25, 0 - 0.25].
    adv = rloo_advantages(np.array([[1.0, 0, 0]]), np.ones((1, 3, 1)), penalty=np.array([[-0.5, 0, 0]]))
    np.testing.assert_allclose(np.asarray(adv)[0, :, 0], [0.5, -0.25, -0.25], atol=1e-7)


# ---- Dr. GRPO --------------------------------------------------------------------------------
@pytest.mark.parametrize(("norm_len", "divisor"), [(None, 4), (8, 8)])
def test_dr_grpo_golden(norm_len, divisor):
    # r = [1, 0, 0, 0]: A = r - mean = [0.75, -0.25, -0.25, -0.25] (no std). Lengths 3, 2, 1, 4,
    # T = 4. On-policy every ratio is 1, so each token's objective is its A. seq_mean_token_sum_norm:
    #   loss = -(1/G) sum_i (sum_t A_i) / divisor = -(0.75*3 - 0.25*2 - 0.25*1 - 0.25*4) / (4 * divisor)
    #        = -0.5 / (4 * divisor): -1/32 with the padded length 4, -1/64 with norm_len = 8.
    # GRPO's seq_mean_token_mean would give -(0.75 - 3*0.25)/4 = 0 here: dividing by the length
    # is what Dr. GRPO removes. The gradient per token is -A_i / (G * divisor), the same for a
    # token of a short and of a long response.
    cfg = LossConfig(algorithm="dr_grpo", group_size=4, **({} if norm_len is None else {"norm_len": norm_len}))
    batch, logp, mask = _on_policy_batch(cfg, [[1.0, 0, 0, 0]], [[3, 2, 1, 4]], 4)
    adv = np.array([0.75, -0.25, -0.25, -0.25])
    np.testing.assert_allclose(batch.advantages, adv[None, :, None] * mask, atol=1e-7)
    value, grad = jax.value_and_grad(lambda lp: mean_loss(cfg, lp, batch))(logp)
    np.testing.assert_allclose(value, -0.5 / (4 * divisor), rtol=1e-6)
    np.testing.assert_allclose(grad, -adv[None, :, None] / (4 * divisor) * mask, rtol=1e-6, atol=1e-9)
    grpo_agg = LossConfig(algorithm="dr_grpo", group_size=4, loss_agg="seq_mean_token_mean")
    np.testing.assert_allclose(mean_loss(grpo_agg, logp, batch), 0.0, atol=1e-7)


# ---- GSPO ------------------------------------------------------------------------------------
# One group, G = 3, T = 3. Token log-ratios logp - old_logp (padding holds NaN):
#   y0 (3 tokens): 0.02, -0.01, 0.02   mean 0.01    -> s0 = e^0.01   = 1.010050 (> 1 + 4e-4)
#   y1 (2 tokens): 0.0001, 0.0003      mean 0.0002  -> s1 = e^0.0002 = 1.000200 (inside the clip)
#   y2 (1 token):  -0.05               mean -0.05   -> s2 = e^-0.05  = 0.951229 (< 1 - 3e-4)
# (The arithmetic mean of y0's token ratios, GRPO-S's weight, is 1.010151: larger, AM >= GM.)
# Rewards [1, 1, 0]: mean 2/3, std sqrt((2/9 + 4/9)/3) = sqrt(2)/3, A = [1/sqrt2, 1/sqrt2, -sqrt2].
# Clip [1 - 3e-4, 1 + 4e-4] = [0.9997, 1.0004]:
#   y0: A > 0, min(s0 A, 1.0004 A) = 1.0004/sqrt2        (clipped high: no gradient)
#   y1: A > 0, s1 inside                 -> s1/sqrt2      (gradient A * s1 / |y1| per token)
#   y2: A < 0, min(s2 A, 0.9997 A) = -0.9997 sqrt2 = -1.9994/sqrt2   (clipped low: no gradient)
# J = (1/3)(1.0004 + s1 - 1.9994)/sqrt2 = (1/3)(0.00120002)/sqrt2 = 2.828474e-4; loss = -J
# (s1 = 1.00020002; with s1 rounded to 1.0002, J = 0.0004/sqrt2 = 2.828427e-4).
J_GSPO = (1.0004 + np.exp(0.0002) - 1.9994) / (3 * S2)
LOG_RATIO = np.array([[[0.02, -0.01, 0.02], [0.0001, 0.0003, np.nan], [-0.05, np.nan, np.nan]]])
GSPO_MASK = np.array([[[1.0, 1, 1], [1, 1, 0], [1, 0, 0]]])


def test_gspo_ratio_and_clipped_objective_golden():
    with jax.enable_x64(True):
        old = jnp.full((1, 3, 3), -2.0)
        logp = old + jnp.asarray(LOG_RATIO)
        s = np.asarray(sequence_geometric_ratios(logp, old, GSPO_MASK))
        np.testing.assert_allclose(s, [[np.exp(0.01), np.exp(0.0002), np.exp(-0.05)]], rtol=1e-12)
        np.testing.assert_allclose(s[0, 0], 1.010050167, rtol=1e-9)
        arithmetic = np.asarray(sequence_ratios(logp, old, GSPO_MASK))
        np.testing.assert_allclose(arithmetic[0, 0], (2 * np.exp(0.02) + np.exp(-0.01)) / 3, rtol=1e-12)
        assert arithmetic[0, 0] > s[0, 0]

        adv = jnp.array([[1 / S2, 1 / S2, -S2]])
        kw = dict(eps_low=3e-4, eps_high=4e-4, ratio_level="sequence_geometric", loss_agg="seq_mean_token_mean")

        def loss(lp):
            out = policy_loss(lp, old, adv, GSPO_MASK, **kw)
            return out.loss_sum / out.denominator

        value, grad = jax.value_and_grad(loss)(logp)
        np.testing.assert_allclose(J_GSPO, 2.828474e-4, rtol=1e-6)
        np.testing.assert_allclose(value, -J_GSPO, rtol=1e-9)
        # Only y1 is unclipped: d(-J)/d logp_{1,t} = -(1/3) A_1 s1 / 2 on its two tokens.
        expected = np.zeros((1, 3, 3))
        expected[0, 1, :2] = -(1 / 3) * (1 / S2) * np.exp(0.0002) / 2
        np.testing.assert_allclose(grad, expected, rtol=1e-9, atol=1e-15)
        out = policy_loss(logp, old, adv, GSPO_MASK, **kw)
        d = out.diagnostics
        assert (float(out.denominator), float(d["clip_frac_high"].total), float(d["clip_frac_low"].total)) == (3, 1, 1)


def test_gspo_recipe_golden():
    # The same group through the recipe: GRPO advantages, one per response, with std + eps
    # (eps = 1e-6): a = (1/3)/(sqrt2/3 + eps) and -2a, so J = a (1.0004 + s1 - 1.9994)/3, which is
    # J_GSPO up to the relative 1e-6 * 3/sqrt2 of eps.
    with jax.enable_x64(True):
        cfg = LossConfig(algorithm="gspo", group_size=3)
        old = np.full((1, 3, 3), -2.0)
        batch, _ = prepare_batch(
            cfg, rewards=np.array([[1.0, 1.0, 0.0]]), mask=GSPO_MASK, old_logp=old, entropy=np.ones_like(old)
        )
        std = S2 / 3
        a = (1 / 3) / (std + 1e-6)
        np.testing.assert_allclose(batch.advantages, [[a, a, -2 * a]], rtol=1e-12)
        value = mean_loss(cfg, jnp.asarray(old + LOG_RATIO), batch)
        np.testing.assert_allclose(value, -a * (1.0004 + np.exp(0.0002) - 1.9994) / 3, rtol=1e-9)
        np.testing.assert_allclose(value, -J_GSPO, rtol=1e-5)
