"""Advantage estimators for GRPO, DAPO, GTPO and GRPO-S over group-aligned arrays.

Layout: `P` prompts, each with a group of `G` responses padded to `T` tokens.
`rewards` is `[P, G]`, `mask` and `entropy` are `[P, G, T]`. `O+` is the set of responses of
a group whose reward is above `success_threshold`, `O-` the rest. Formulas and the choices
the paper leaves open: docs/algorithms.md (equation numbers of arXiv 2508.04349 v6).

Every function here is pure and jit-able (modes and hyperparameters are static Python
values), treats `rewards`, `entropy` and `mask` as constants (no gradient flows into them),
and ignores whatever values padded positions hold: they are replaced before any arithmetic,
so NaN or inf in padding cannot leak into the result.

The `*_from_sets` variants take the success sets explicitly (`correct`, `[P, G]` bool). The
trainer uses them when the reward that enters the formula has been shaped (for instance by
the DAPO overlong penalty) but the success decision must stay on the verifier's verdict.

Two optional `[P, G]` inputs reach every estimator the same way:

- `valid` (bool): responses that belong to their group. A response whose reward errored, timed
  out or crashed, or a truncated response under `mask_truncated`, is *not* valid: it is in
  neither O+ nor O-, counts in no statistic (group mean/std, `d_t`, `h_t`, `n`, `m`, the
  set normalisations) and gets advantage 0. A group is informative when its valid responses
  hold at least one success and one failure.
- `penalty` (<= 0): DAPO's overlong penalty of each response. It lowers the reward of correct
  *and* wrong responses alike: GRPO/DAPO use `r_i + penalty_i`; GTPO's Eq. 3 uses
  `alpha1 * (r_i + penalty_i)` and Eq. 5 `alpha1 * (-1 + penalty_j)` in place of `-alpha1`;
  GRPO-S's Eq. 9 likewise with `beta1` (docs/algorithms.md, "The overlong penalty").

Keyword defaults come from `config.BASE_DEFAULTS`, the one place default values are written.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from gtpo_jax.losses.config import BASE_DEFAULTS, GRPOSNorm, GTPONorm, NormScope
from gtpo_jax.losses.groups import (  # noqa: F401  (public names of this module too)
    as_constant,
    informative_from_sets,
    informative_groups,
    overlong_penalty,
    success_sets,
    valid_or_all,
)
from gtpo_jax.losses.stats import (
    float_dtype,
    masked_mean_std,
    parse_enum,
    reciprocal_or_zero,
    safe_divide,
    sums_over,
)


def grpo_advantages(
    rewards: Float[ArrayLike, "P G"],
    mask: ArrayLike,
    *,
    scale_rewards: bool = BASE_DEFAULTS["scale_rewards"],
    eps: float = BASE_DEFAULTS["eps"],
    valid: Bool[ArrayLike, "P G"] | None = None,
    penalty: Float[ArrayLike, "P G"] | None = None,
) -> Float[Array, "P G T"]:
    """GRPO (and DAPO): `A_i = (r_i - mean_G r) / (std_G r + eps)`, broadcast to the response's tokens
    (docs/algorithms.md, "GRPO").

    Population std over the group's valid responses; `r_i` includes the overlong `penalty`.
    `scale_rewards=False` is Dr.GRPO (no division by std). A group whose rewards are all
    equal gets exactly zero advantage; padding and invalid responses get 0.
    """
    dtype = float_dtype(rewards)
    r = as_constant(rewards, dtype)
    if penalty is not None:
        r = r + as_constant(penalty, dtype)
    m = as_constant(mask, dtype)
    v = valid_or_all(valid, r).astype(dtype)
    mean, std = masked_mean_std(jnp.where(v > 0, r, 0), v, (-1,))
    adv = r - mean
    if scale_rewards:
        adv = adv / (std + eps)
    # Equal rewards give exactly 0 (the mean's round-off would otherwise leave a tiny residue).
    high = jnp.max(jnp.where(v > 0, r, -jnp.inf), axis=-1, keepdims=True)
    same = high == jnp.min(jnp.where(v > 0, r, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(same, 0.0, adv * v)[..., None] * m


class _PositionSums(NamedTuple):
    """Sums over the group at each position, `[P, 1, T]`: everything GTPO needs beyond one token."""

    d: Array  # alive O+ responses, d_t
    h: Array  # alive O- responses, h_t
    sum_h_pos: Array  # sum over alive O+ of H
    sum_inv_h_neg: Array  # sum over alive O- of 1/H
    sum_r_pos: Array  # sum over alive O+ of the outcome reward r_i (+ its overlong penalty)
    sum_pen_neg: Array  # sum over alive O- of the overlong penalty


class _GTPOTokens(NamedTuple):
    w_pos: Array  # [P, G, T] 0/1: valid O+ tokens
    w_neg: Array  # [P, G, T] 0/1: valid O- tokens
    shaped: Array  # [P, G, T] r+ on O+ tokens, r- on O- tokens, 0 on padding
    sums: _PositionSums


def _gtpo_tokens(
    rewards: ArrayLike,
    correct: ArrayLike,
    entropy: ArrayLike,
    mask: ArrayLike,
    alpha1: float,
    alpha2: float,
    eps: float,
    valid: ArrayLike | None = None,
    penalty: ArrayLike | None = None,
) -> _GTPOTokens:
    dtype = float_dtype(rewards, entropy)
    r = as_constant(rewards, dtype)[..., None]
    pen = jnp.zeros_like(r) if penalty is None else as_constant(penalty, dtype)[..., None]
    r = r + pen
    # Invalid responses leave the group: no token of theirs is alive for the set counts.
    m = as_constant(mask, dtype) * valid_or_all(valid, rewards).astype(dtype)[..., None]
    c = jnp.asarray(correct, dtype=bool)[..., None]
    w_pos = m * c.astype(dtype)
    w_neg = m - w_pos
    # Padding holds anything: replace it before arithmetic. Entropy is non-negative; the clamp
    # only removes round-off below zero.
    h = jnp.where(m > 0, jnp.maximum(as_constant(entropy, dtype), 0), 1.0) + eps
    sums = _PositionSums(*sums_over(1, w_pos, w_neg, w_pos * h, w_neg / h, w_pos * r, w_neg * pen))
    # Per-token work is one division; the per-position sums are inverted once.
    r_pos = alpha1 * r + alpha2 * (sums.d * reciprocal_or_zero(sums.sum_h_pos)) * h
    r_neg = alpha1 * (pen - 1.0) - alpha2 * (sums.h * reciprocal_or_zero(sums.sum_inv_h_neg)) / h
    shaped = jnp.where(c, r_pos, r_neg) * m
    return _GTPOTokens(w_pos, w_neg, shaped, sums)


def gtpo_token_rewards_from_sets(
    rewards: Float[ArrayLike, "P G"],
    correct: Bool[ArrayLike, "P G"],
    entropy: Float[ArrayLike, "P G T"],
    mask: ArrayLike,
    *,
    alpha1: float = BASE_DEFAULTS["alpha1"],
    alpha2: float = BASE_DEFAULTS["alpha2"],
    eps: float = BASE_DEFAULTS["eps"],
    valid: Bool[ArrayLike, "P G"] | None = None,
    penalty: Float[ArrayLike, "P G"] | None = None,
) -> Float[Array, "P G T"]:
    """GTPO's shaped token rewards (Eq. 3 and Eq. 5; docs/algorithms.md, "GTPO"): `r+` on O+ tokens,
    `r-` on O- tokens, 0 on padding.

        r+_{i,t} = alpha1 * (r_i + pen_i)  + alpha2 * d_t * H_{i,t} / sum_{k in O+ alive at t} H_{k,t}
        r-_{j,t} = alpha1 * (-1 + pen_j)   - alpha2 * h_t * (1/H_{j,t}) / sum_{k in O- alive at t} (1/H_{k,t})

    `d_t` / `h_t` count the alive valid O+ / O- responses at position t; `H` is `entropy + eps`;
    `pen` is the overlong penalty (0 without one), so Eq. 5's constant `-alpha1` becomes
    `alpha1 * (-1 + pen_j)`. Invalid responses get 0.
    """
    return _gtpo_tokens(rewards, correct, entropy, mask, alpha1, alpha2, eps, valid, penalty).shaped


def gtpo_token_rewards(
    rewards: Float[ArrayLike, "P G"],
    entropy: Float[ArrayLike, "P G T"],
    mask: ArrayLike,
    *,
    alpha1: float = BASE_DEFAULTS["alpha1"],
    alpha2: float = BASE_DEFAULTS["alpha2"],
    success_threshold: float = BASE_DEFAULTS["success_threshold"],
    eps: float = BASE_DEFAULTS["eps"],
) -> Float[Array, "P G T"]:
    """`gtpo_token_rewards_from_sets` with O+ decided by `rewards > success_threshold`."""
    correct = success_sets(rewards, success_threshold=success_threshold)
    return gtpo_token_rewards_from_sets(rewards, correct, entropy, mask, alpha1=alpha1, alpha2=alpha2, eps=eps)


def gtpo_advantages_from_sets(
    rewards: Float[ArrayLike, "P G"],
    correct: Bool[ArrayLike, "P G"],
    entropy: Float[ArrayLike, "P G T"],
    mask: ArrayLike,
    *,
    alpha1: float = BASE_DEFAULTS["alpha1"],
    alpha2: float = BASE_DEFAULTS["alpha2"],
    eps: float = BASE_DEFAULTS["eps"],
    norm: GTPONorm | str = BASE_DEFAULTS["gtpo_norm"],
    scope: NormScope | str = BASE_DEFAULTS["norm_scope"],
    valid: Bool[ArrayLike, "P G"] | None = None,
    penalty: Float[ArrayLike, "P G"] | None = None,
) -> Float[Array, "P G T"]:
    """GTPO token advantages (Eq. 6) given the success sets; see `gtpo_advantages`.

    The set means need no pass over the shaped rewards: at every position the entropy shares
    of the alive responses of a set sum to 1, so over a group

        sum_{O+ tokens} r+ = alpha1 * sum_{O+ tokens} (r_i + pen_i) + alpha2 * N+
        sum_{O- tokens} r- = alpha1 * sum_{O- tokens} pen_j - (alpha1 + alpha2) * N-

    (`N+`, `N-` the token counts of the sets). One centred sum of squares then gives each
    variance: for `paper` the other set's tokens hold 0 and add `N- * mean+^2` (resp.
    `N+ * mean-^2`). Only tokens of informative groups enter the statistics.
    """
    norm = parse_enum(GTPONorm, norm, "norm")
    scope = parse_enum(NormScope, scope, "scope")
    tok = _gtpo_tokens(rewards, correct, entropy, mask, alpha1, alpha2, eps, valid, penalty)
    dtype = tok.shaped.dtype
    informative = informative_from_sets(correct, valid_or_all(valid, rewards)).astype(dtype)[:, None, None]
    axes = (1, 2) if scope is NormScope.GROUP else (0, 1, 2)

    # [P, 1, T] per-position sums -> per-group (or batch) totals.
    position_sums = (tok.sums.d, tok.sums.h, tok.sums.sum_r_pos, tok.sums.sum_pen_neg)
    n_pos, n_neg, sum_r_pos, sum_pen_neg = sums_over(axes, *(x * informative for x in position_sums))
    sum_pos = alpha1 * sum_r_pos + alpha2 * n_pos
    sum_neg = alpha1 * sum_pen_neg - (alpha1 + alpha2) * n_neg
    mean_pos, mean_neg = _set_means(norm, sum_pos, sum_neg, n_pos, n_neg)

    w_pos, w_neg = tok.w_pos * informative, tok.w_neg * informative
    dev = tok.shaped - jnp.where(w_pos > 0, mean_pos, mean_neg)
    sq_pos, sq_neg = sums_over(axes, w_pos * jnp.square(dev), w_neg * jnp.square(dev))
    var_pos, var_neg = _set_variances(norm, sq_pos, sq_neg, n_pos, n_neg, mean_pos, mean_neg)
    scale = jnp.where(w_pos > 0, 1.0 / (jnp.sqrt(var_pos) + eps), 1.0 / (jnp.sqrt(var_neg) + eps))
    return dev * scale * (w_pos + w_neg)


def _mean(total: Array, n: Array) -> Array:
    return total / jnp.maximum(n, 1)


def _set_means(norm: GTPONorm, sum_pos: Array, sum_neg: Array, n_pos: Array, n_neg: Array) -> tuple[Array, Array]:
    """`mean R+`, `mean R-` of Eq. 6 under `norm`, from the sets' sums and token counts."""
    n_all = n_pos + n_neg
    if norm is GTPONorm.PAPER:
        return _mean(sum_pos, n_all), _mean(sum_neg, n_all)
    if norm is GTPONorm.OWN_SET:
        return _mean(sum_pos, n_pos), _mean(sum_neg, n_neg)
    joint = _mean(sum_pos + sum_neg, n_all)
    return joint, joint


def _set_variances(
    norm: GTPONorm, sq_pos: Array, sq_neg: Array, n_pos: Array, n_neg: Array, mean_pos: Array, mean_neg: Array
) -> tuple[Array, Array]:
    """`var R+`, `var R-` of Eq. 6 from each set's centred sum of squares; under `paper` the other
    set's tokens hold 0 and add `n_other * mean^2`."""
    n_all = n_pos + n_neg
    if norm is GTPONorm.PAPER:
        return _mean(sq_pos + n_neg * jnp.square(mean_pos), n_all), _mean(sq_neg + n_pos * jnp.square(mean_neg), n_all)
    if norm is GTPONorm.OWN_SET:
        return _mean(sq_pos, n_pos), _mean(sq_neg, n_neg)
    joint = _mean(sq_pos + sq_neg, n_all)
    return joint, joint


def gtpo_advantages(
    rewards: Float[ArrayLike, "P G"],
    entropy: Float[ArrayLike, "P G T"],
    mask: ArrayLike,
    *,
    alpha1: float = BASE_DEFAULTS["alpha1"],
    alpha2: float = BASE_DEFAULTS["alpha2"],
    success_threshold: float = BASE_DEFAULTS["success_threshold"],
    eps: float = BASE_DEFAULTS["eps"],
    norm: GTPONorm | str = BASE_DEFAULTS["gtpo_norm"],
    scope: NormScope | str = BASE_DEFAULTS["norm_scope"],
    valid: Bool[ArrayLike, "P G"] | None = None,
    penalty: Float[ArrayLike, "P G"] | None = None,
) -> Float[Array, "P G T"]:
    """GTPO: entropy-shaped token rewards (Eq. 3, 5), normalised per set (Eq. 6); docs/algorithms.md.

    `norm="paper"` (default): `R+` holds `r+` on O+ tokens and 0 on O- tokens, and its
    mean and population std are taken over all valid tokens of the group (`R-` likewise);
    `A+ = (r+ - mean R+) / (std R+ + eps)` is written to O+ tokens, `A-` to O- tokens.
    `"own_set"` takes each set's statistics over its own tokens, `"joint"` one mean/std over
    all shaped rewards. `scope="batch"` pools the statistics over every informative group.

    With binary rewards, `alpha1 = 1` and `p` the fraction of the group's valid tokens in
    O+, the paper norm gives every O+ token `A > 0` and every O- token `A < 0` exactly when
    `alpha2 / (alpha1 + alpha2) < p < alpha1 / (alpha1 + alpha2)` (0.091 < p < 0.909 at the
    defaults): the set means are `(alpha1 + alpha2) * p` and `-(alpha1 + alpha2) * (1 - p)`,
    while `r+ > alpha1` and `r- < -alpha1`. Outside that range part of the majority set's
    tokens get the opposite sign (the trainer logs the fractions; docs/algorithms.md, "When the
    paper norm flips a sign"). Groups with no success or
    no failure get 0. `valid` and `penalty`: see the module docstring.
    """
    correct = success_sets(rewards, success_threshold=success_threshold)
    return gtpo_advantages_from_sets(
        rewards,
        correct,
        entropy,
        mask,
        alpha1=alpha1,
        alpha2=alpha2,
        eps=eps,
        norm=norm,
        scope=scope,
        valid=valid,
        penalty=penalty,
    )


def grpo_s_sequence_rewards_from_sets(
    rewards: Float[ArrayLike, "P G"],
    correct: Bool[ArrayLike, "P G"],
    entropy: Float[ArrayLike, "P G T"],
    mask: ArrayLike,
    *,
    beta1: float = BASE_DEFAULTS["beta1"],
    beta2: float = BASE_DEFAULTS["beta2"],
    eps: float = BASE_DEFAULTS["eps"],
    valid: Bool[ArrayLike, "P G"] | None = None,
    penalty: Float[ArrayLike, "P G"] | None = None,
) -> Float[Array, "P G"]:
    """GRPO-S shaped sequence rewards (Eq. 9; docs/algorithms.md, "GRPO-S"), with `Ĥ_i` the mean
    entropy of response i plus eps.

    r+_i = beta1 * (r_i + pen_i) + beta2 * n * Ĥ_i / sum_{k in O+} Ĥ_k
    r-_j = beta1 * (-1 + pen_j)  - beta2 * m * (1/Ĥ_j) / sum_{k in O-} (1/Ĥ_k)

    `n`, `m` and the sums run over valid responses; `pen` is the overlong penalty (0 without
    one). Invalid responses get 0.
    """
    dtype = float_dtype(rewards, entropy)
    r = as_constant(rewards, dtype)
    pen = jnp.zeros_like(r) if penalty is None else as_constant(penalty, dtype)
    correct = jnp.asarray(correct, dtype=bool)
    v = valid_or_all(valid, rewards)
    m = as_constant(mask, dtype)
    h = jnp.where(m > 0, jnp.maximum(as_constant(entropy, dtype), 0), 0.0)
    sum_h, count = sums_over(-1, h, m)
    mean_h = sum_h[..., 0] / jnp.maximum(count[..., 0], 1) + eps  # [P, G]
    inv_h = 1.0 / mean_h
    pos = (correct & v).astype(dtype)
    neg = (~correct & v).astype(dtype)
    n = jnp.sum(pos, axis=-1, keepdims=True)
    m_count = jnp.sum(neg, axis=-1, keepdims=True)
    share_pos = safe_divide(mean_h, jnp.sum(pos * mean_h, axis=-1, keepdims=True))
    share_neg = safe_divide(inv_h, jnp.sum(neg * inv_h, axis=-1, keepdims=True))
    r_pos = pos * (beta1 * (r + pen) + beta2 * n * share_pos)
    r_neg = neg * (beta1 * (pen - 1.0) - beta2 * m_count * share_neg)
    return r_pos + r_neg


def grpo_s_advantages_from_sets(
    rewards: Float[ArrayLike, "P G"],
    correct: Bool[ArrayLike, "P G"],
    entropy: Float[ArrayLike, "P G T"],
    mask: ArrayLike,
    *,
    beta1: float = BASE_DEFAULTS["beta1"],
    beta2: float = BASE_DEFAULTS["beta2"],
    eps: float = BASE_DEFAULTS["eps"],
    norm: GRPOSNorm | str = BASE_DEFAULTS["grpo_s_norm"],
    valid: Bool[ArrayLike, "P G"] | None = None,
    penalty: Float[ArrayLike, "P G"] | None = None,
) -> Float[Array, "P G"]:
    """GRPO-S sequence advantages given the success sets; see `grpo_s_advantages`.

    The normalisations run over the group's valid responses (the length-G vector of the
    paper, less the invalid entries)."""
    norm = parse_enum(GRPOSNorm, norm, "norm")
    dtype = float_dtype(rewards, entropy)
    correct = jnp.asarray(correct, dtype=bool)
    v = valid_or_all(valid, rewards)
    shaped = grpo_s_sequence_rewards_from_sets(
        rewards, correct, entropy, mask, beta1=beta1, beta2=beta2, eps=eps, valid=v, penalty=penalty
    )
    pos = (correct & v).astype(dtype)
    neg = (~correct & v).astype(dtype)
    every = v.astype(dtype)
    if norm is GRPOSNorm.PAPER:
        mean_pos, std_pos = masked_mean_std(shaped * pos, every, (-1,))
        mean_neg, std_neg = masked_mean_std(shaped * neg, every, (-1,))
    else:
        mean_pos, std_pos = masked_mean_std(shaped, every, (-1,))
        mean_neg, std_neg = mean_pos, std_pos
    adv = pos * (shaped - mean_pos) / (std_pos + eps) + neg * (shaped - mean_neg) / (std_neg + eps)
    return adv * informative_from_sets(correct, v).astype(dtype)[:, None]


def grpo_s_advantages(
    rewards: Float[ArrayLike, "P G"],
    entropy: Float[ArrayLike, "P G T"],
    mask: ArrayLike,
    *,
    beta1: float = BASE_DEFAULTS["beta1"],
    beta2: float = BASE_DEFAULTS["beta2"],
    success_threshold: float = BASE_DEFAULTS["success_threshold"],
    eps: float = BASE_DEFAULTS["eps"],
    norm: GRPOSNorm | str = BASE_DEFAULTS["grpo_s_norm"],
    valid: Bool[ArrayLike, "P G"] | None = None,
    penalty: Float[ArrayLike, "P G"] | None = None,
) -> Float[Array, "P G"]:
    """GRPO-S: entropy-shaped sequence rewards (Eq. 9), normalised over the G responses (docs/algorithms.md).

    `norm="paper"` (default): O+ and O- are normalised separately, each over a length-G
    vector holding the set's shaped rewards and 0 for the other set (population std), and
    each advantage is written to its own set's responses. `"joint"`: one mean/std over all
    G shaped rewards. With `beta2 = 0` and binary rewards both equal GRPO advantages. Groups
    with no success or no failure get 0. Returns one advantage per response, `[P, G]`.
    """
    correct = success_sets(rewards, success_threshold=success_threshold)
    return grpo_s_advantages_from_sets(
        rewards, correct, entropy, mask, beta1=beta1, beta2=beta2, eps=eps, norm=norm, valid=valid, penalty=penalty
    )
