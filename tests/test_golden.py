"""Golden values derived by hand from the equations of docs/algorithms.md (GRPO; GTPO Eq. 3, 5, 6;
GRPO-S Eq. 9), never from the code under test.

One group, G = 4 responses, T = 5, unequal lengths 5, 3, 4, 2; responses 0 and 1 are
correct (O+), 2 and 3 wrong (O-). Valid entropies (padding holds NaN / huge garbage):

    i0 (O+): 1   2   1   3   0.5
    i1 (O+): 3   2   1   .   .
    i2 (O-): 1   1   2   2   .
    i3 (O-): 1   3   .   .   .

Defaults alpha1 = beta1 = 1, alpha2 = beta2 = 0.1, eps = 1e-6. The shaped rewards below are
exact for eps -> 0; eps moves them by < 1e-6 relative. eps in std + eps is kept in the
expected values because it matters at the 1e-5 level when a std is as small as 0.025.
"""

import numpy as np
import pytest

from gtpo_jax.losses import grpo_advantages, grpo_s_advantages, gtpo_advantages, gtpo_token_rewards
from gtpo_jax.losses.advantages import grpo_s_sequence_rewards_from_sets

EPS = 1e-6
NAN, BIG = np.nan, 1e30
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], np.float32)
ENTROPY = np.array([[1, 2, 1, 3, 0.5], [3, 2, 1, NAN, BIG], [1, 1, 2, 2, -BIG], [1, 3, NAN, BIG, NAN]], np.float32)
REWARDS = np.array([1.0, 1.0, 0.0, 0.0], np.float32)


def _batch(*groups):
    """Stacks per-prompt arrays into [P, ...]."""
    return np.stack(groups)


def test_grpo_golden():
    # Prompt A: r = [1, 1, 0, 0]: mean 0.5, population std sqrt(4 * 0.25 / 4) = 0.5,
    #   A = (+-0.5) / 0.5 = +-1.
    # Prompt B: r = [1, 0, 0, 0]: mean 0.25, var = (0.75^2 + 3 * 0.25^2) / 4 = 0.75 / 4 = 3/16,
    #   std = sqrt(3)/4; A = 0.75 / (sqrt(3)/4) = sqrt(3) and -0.25 / (sqrt(3)/4) = -1/sqrt(3).
    # Prompt C: r = [0, 0.5, 1, 0.5]: mean 0.5, var = (0.25 + 0 + 0.25 + 0) / 4 = 1/8,
    #   std = 1/(2 sqrt(2)); A = -0.5 * 2 sqrt(2) = -sqrt(2), 0, sqrt(2), 0.
    rewards = _batch(REWARDS, [1.0, 0, 0, 0], [0.0, 0.5, 1.0, 0.5])
    mask = _batch(MASK, MASK, MASK)
    adv = np.asarray(grpo_advantages(rewards, mask))
    s3, s2 = np.sqrt(3.0), np.sqrt(2.0)
    per_response = np.array(
        [
            [0.5 / (0.5 + EPS), 0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS)],
            [0.75 / (s3 / 4 + EPS), -0.25 / (s3 / 4 + EPS), -0.25 / (s3 / 4 + EPS), -0.25 / (s3 / 4 + EPS)],
            [-0.5 / (1 / (2 * s2) + EPS), 0.0, 0.5 / (1 / (2 * s2) + EPS), 0.0],
        ]
    )
    np.testing.assert_allclose(adv, per_response[..., None] * mask, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(per_response[1, 0], s3, rtol=1e-5)  # the hand value itself

    # Dr.GRPO (scale_rewards=False): A = r - mean, e.g. prompt B: 0.75, -0.25, -0.25, -0.25.
    adv = np.asarray(grpo_advantages(rewards, mask, scale_rewards=False))
    centred = np.array([[0.5, 0.5, -0.5, -0.5], [0.75, -0.25, -0.25, -0.25], [-0.5, 0.0, 0.5, 0.0]])
    np.testing.assert_allclose(adv, centred[..., None] * mask, atol=1e-7)


# GTPO shaped token rewards, position by position (Eq. 3 for O+, Eq. 5 for O-):
#   t0: O+ alive {i0: H=1, i1: H=3}, d=2, sum H = 4: r+ = 1 + 0.1*2*1/4 = 1.05 and 1 + 0.1*2*3/4 = 1.15
#       O- alive {i2: 1, i3: 1}, h=2, sum 1/H = 2:   r- = -1 - 0.1*2*1/2 = -1.1 for both
#   t1: O+ {2, 2}: r+ = 1 + 0.2*2/4 = 1.1 each;  O- {1, 3}: sum 1/H = 4/3,
#       r-(i2) = -1 - 0.2*1/(4/3) = -1.15,  r-(i3) = -1 - 0.2*(1/3)/(4/3) = -1.05
#   t2: O+ {1, 1}: 1 + 0.2*1/2 = 1.1 each;   O- only i2 alive: -1 - 0.1*1*1 = -1.1
#   t3: O+ only i0: 1 + 0.1*1*1 = 1.1;       O- only i2: -1.1
#   t4: O+ only i0: 1.1;                     O- none alive
SHAPED = np.array(
    [
        [1.05, 1.1, 1.1, 1.1, 1.1],
        [1.15, 1.1, 1.1, 0, 0],
        [-1.1, -1.15, -1.1, -1.1, 0],
        [-1.1, -1.05, 0, 0, 0],
    ]
)
POS = np.array([1, 1, 0, 0], bool)[:, None] & (MASK > 0)
NEG = np.array([0, 0, 1, 1], bool)[:, None] & (MASK > 0)


def test_gtpo_shaped_rewards_golden():
    shaped = np.asarray(gtpo_token_rewards(REWARDS[None], ENTROPY[None], MASK[None]))[0]
    np.testing.assert_allclose(shaped, SHAPED, rtol=2e-6, atol=1e-6)
    # Totals: 8 O+ tokens sum to 8.8 = 1.1 * 8, 6 O- tokens to -6.6 (alpha1 + alpha2 = 1.1 per token).
    np.testing.assert_allclose(shaped[POS].sum(), 8.8, rtol=1e-6)
    np.testing.assert_allclose(shaped[NEG].sum(), -6.6, rtol=1e-6)


def _normalised(values, mean, var):
    return (values - mean) / (np.sqrt(var) + EPS)


def test_gtpo_paper_norm_golden():
    # R+ = r+ on the 8 O+ tokens and 0 on the 6 O- tokens, over all N = 14 valid tokens:
    #   mean+ = 8.8 / 14 = 0.628571;  sum (r+)^2 = 1.05^2 + 1.15^2 + 6 * 1.1^2 = 9.685
    #   var+ = 9.685 / 14 - (8.8/14)^2 = 0.691786 - 0.395102 = 0.296684, std+ = 0.544687
    #   A+(1.1) = (1.1 - 0.628571) / 0.544687 = 0.865504, A+(1.05) = 0.773708, A+(1.15) = 0.957300
    # R- = r- on the 6 O- tokens and 0 elsewhere:
    #   mean- = -6.6 / 14 = -0.471429;  sum (r-)^2 = 4 * 1.1^2 + 1.15^2 + 1.05^2 = 7.265
    #   var- = 7.265 / 14 - (6.6/14)^2 = 0.518929 - 0.222245 = 0.296684 (same as var+), std- = 0.544687
    #   A-(-1.1) = (-1.1 + 0.471429) / 0.544687 = -1.154005, A-(-1.15) = -1.245801, A-(-1.05) = -1.062209
    adv = np.asarray(gtpo_advantages(REWARDS[None], ENTROPY[None], MASK[None], norm="paper"))[0]
    expected = np.zeros((4, 5))
    expected[POS] = _normalised(SHAPED[POS], 8.8 / 14, 9.685 / 14 - (8.8 / 14) ** 2)
    expected[NEG] = _normalised(SHAPED[NEG], -6.6 / 14, 7.265 / 14 - (6.6 / 14) ** 2)
    np.testing.assert_allclose(expected[0, :2], [0.773708, 0.865504], atol=2e-6)  # the hand values above
    np.testing.assert_allclose(expected[2, :2], [-1.154005, -1.245801], atol=2e-6)
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)


def test_gtpo_own_set_norm_golden():
    # O+ statistics over its own 8 tokens: mean 8.8/8 = 1.1, deviations -0.05 (once), +0.05 (once),
    #   0 (six times): var = 2 * 0.0025 / 8 = 0.000625, std = 0.025 -> A = -2, +2, 0.
    # O- over its 6 tokens: mean -6.6/6 = -1.1, deviations -0.05 (i2,t1), +0.05 (i3,t1):
    #   var = 0.005 / 6, std = 0.028868 -> A = -/+ 0.05/0.028868 = -/+ sqrt(3) = -/+1.732051, others 0.
    adv = np.asarray(gtpo_advantages(REWARDS[None], ENTROPY[None], MASK[None], norm="own_set"))[0]
    expected = np.zeros((4, 5))
    expected[POS] = _normalised(SHAPED[POS], 1.1, 0.000625)
    expected[NEG] = _normalised(SHAPED[NEG], -1.1, 0.005 / 6)
    np.testing.assert_allclose(expected[0, 0], -2.0, atol=1e-3)
    np.testing.assert_allclose(expected[3, 1], np.sqrt(3.0), atol=1e-3)
    # float32 shaped rewards carry ~1e-7 round-off, amplified by 1/std = 40 -> atol 2e-5.
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=2e-5)


def test_gtpo_joint_norm_golden():
    # One mean/std over all 14 shaped rewards: mean = (8.8 - 6.6)/14 = 2.2/14 = 0.157143,
    #   sum r^2 = 9.685 + 7.265 = 16.95, var = 16.95/14 - (2.2/14)^2 = 1.210714 - 0.024694 = 1.186020,
    #   std = 1.089046; A(1.1) = (1.1 - 0.157143)/1.089046 = 0.865764, A(-1.1) = -1.154353.
    adv = np.asarray(gtpo_advantages(REWARDS[None], ENTROPY[None], MASK[None], norm="joint"))[0]
    valid = MASK > 0
    expected = np.zeros((4, 5))
    expected[valid] = _normalised(SHAPED[valid], 2.2 / 14, 16.95 / 14 - (2.2 / 14) ** 2)
    np.testing.assert_allclose(expected[0, 1], 0.865764, atol=2e-6)
    np.testing.assert_allclose(expected[2, 0], -1.154353, atol=2e-6)
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)


def test_gtpo_uninformative_group_is_zero_beside_golden_group():
    # A second prompt whose 4 responses are all correct has n = G, m = 0: advantages exactly 0,
    # and it does not disturb the first prompt's (per-group) statistics.
    rewards = _batch(REWARDS, np.ones(4, np.float32))
    adv = np.asarray(gtpo_advantages(rewards, _batch(ENTROPY, ENTROPY), _batch(MASK, MASK)))
    assert np.all(adv[1] == 0.0)
    alone = np.asarray(gtpo_advantages(REWARDS[None], ENTROPY[None], MASK[None]))[0]
    np.testing.assert_array_equal(adv[0], alone)


# GRPO-S: mean entropy of each response over its own valid tokens (Eq. 9's H-hat):
#   i0: (1+2+1+3+0.5)/5 = 1.5   i1: (3+2+1)/3 = 2   i2: (1+1+2+2)/4 = 1.5   i3: (1+3)/2 = 2
# O+: n = 2, sum H-hat = 3.5:  r+(i0) = 1 + 0.1*2*1.5/3.5 = 38/35,  r+(i1) = 1 + 0.1*2*2/3.5 = 39/35
# O-: m = 2, 1/H-hat = 2/3, 1/2, sum = 7/6:
#   r-(i2) = -1 - 0.1*2*(2/3)/(7/6) = -1 - 4/35 = -39/35,  r-(i3) = -1 - 0.1*2*(1/2)/(7/6) = -38/35
SEQ_SHAPED = np.array([38 / 35, 39 / 35, -39 / 35, -38 / 35])


@pytest.mark.parametrize("norm", ["paper", "joint"])
def test_grpo_s_golden(norm):
    correct = REWARDS[None] > 0.5
    shaped = np.asarray(grpo_s_sequence_rewards_from_sets(REWARDS[None], correct, ENTROPY[None], MASK[None]))[0]
    np.testing.assert_allclose(shaped, SEQ_SHAPED, rtol=2e-6)

    adv = np.asarray(grpo_s_advantages(REWARDS[None], ENTROPY[None], MASK[None], norm=norm))[0]
    if norm == "paper":
        # R+ = [38/35, 39/35, 0, 0]: mean = (77/35)/4 = 0.55, sum sq = (1444 + 1521)/1225 = 2965/1225,
        #   var = 2965/4900 - 0.55^2 = 0.605102 - 0.3025 = 0.302602, std = 0.550093;
        #   A+(i0) = (1.085714 - 0.55)/0.550093 = 0.973860, A+(i1) = 1.025799.
        # R- = [0, 0, -39/35, -38/35]: mean -0.55, same var -> A-(i2) = -1.025799, A-(i3) = -0.973860.
        var = 2965 / 4900 - 0.55**2
        expected = np.array(
            [
                _normalised(38 / 35, 0.55, var),
                _normalised(39 / 35, 0.55, var),
                _normalised(-39 / 35, -0.55, var),
                _normalised(-38 / 35, -0.55, var),
            ]
        )
        np.testing.assert_allclose(expected, [0.973860, 1.025799, -1.025799, -0.973860], atol=1e-6)
    else:
        # One mean over the 4 rewards: 0 (they cancel); var = 2 * 2965/1225 / 4 = 2965/2450 = 1.210204,
        #   std = 1.100093; A = r / std = 0.986929, 1.012901, -1.012901, -0.986929.
        expected = _normalised(SEQ_SHAPED, 0.0, 2965 / 2450)
        np.testing.assert_allclose(expected, [0.986929, 1.012901, -1.012901, -0.986929], atol=1e-6)
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)
