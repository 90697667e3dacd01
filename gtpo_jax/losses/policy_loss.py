"""The clipped policy-gradient objective over `[P, G, T]` token groups.

Pieces, each a small pure function:

- `clipped_surrogate`: PPO/DAPO `min(w*A, clip(w, 1-eps_low, 1+eps_high)*A)` with optional
  dual clip (Ye et al., 2020: for `A < 0` the objective is bounded below by `c*A`).
- `token_ratios` / `sequence_ratios` / `sequence_geometric_ratios`: the token importance
  weight `exp(logp - old_logp)` (DAPO, GTPO, Eq. 7), GRPO-S's per-response arithmetic mean of
  its token ratios, or GSPO's geometric mean `exp(mean_t (logp - old_logp))`.
- `kl_penalty`: estimators `k1` (`logp - ref`) and `k3` (`exp(ref-logp) - (ref-logp) - 1`,
  via `expm1` so it keeps precision when the policies are close).
- `aggregate`: turns per-token losses into a *(sum, denominator)* pair. Summing both over
  micro-batches and devices and dividing once gives exactly the full-batch loss, which is
  why no mode divides inside. Modes are named after their denominator.

`policy_loss` wires them together and returns diagnostics as accumulable stats. The
objectives (Eq. 7 for GRPO/DAPO/GTPO, GRPO-S's sequence-ratio form) and the aggregation and
KL options: docs/algorithms.md.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from gtpo_jax.losses.config import BASE_DEFAULTS, KLEstimator, LossAgg, RatioLevel
from gtpo_jax.losses.stats import Diagnostics, MaxStat, MeanStat, MinStat, float_dtype, parse_enum


class LossOutput(NamedTuple):
    """`loss = loss_sum / denominator`, after summing both over micro-batches and devices."""

    loss_sum: Array
    denominator: Array
    diagnostics: Diagnostics


def _valid(mask: ArrayLike, dtype: jnp.dtype) -> Array:
    return jax.lax.stop_gradient(jnp.asarray(mask).astype(dtype))


def token_log_ratios(logp: Array, old_logp: ArrayLike, mask: Array) -> Array:
    """`logp - old_logp` on valid tokens, exactly 0 on padding (whatever padding holds).

    Inputs are replaced *before* the subtraction, so neither the value nor the gradient of
    a padded position can become NaN (`where` passes a zero cotangent to the unused branch).
    """
    keep = mask > 0
    return jnp.where(keep, logp, 0) - jax.lax.stop_gradient(jnp.where(keep, old_logp, 0))


def token_ratios(logp: Array, old_logp: ArrayLike, mask: Array) -> Float[Array, "P G T"]:
    """Token importance weights `w_{i,t} = exp(logp - old_logp)` (1 on padding)."""
    return jnp.exp(token_log_ratios(logp, old_logp, mask))


def sequence_ratios(logp: Array, old_logp: ArrayLike, mask: Array) -> Float[Array, "P G"]:
    """GRPO-S weights: `ŵ_i = mean_{t valid} exp(logp - old_logp)` (1 for an empty response)."""
    ratio = token_ratios(logp, old_logp, mask)
    count = jnp.sum(mask, axis=-1)
    return jnp.where(count > 0, jnp.sum(mask * ratio, axis=-1) / jnp.maximum(count, 1), 1.0)


def sequence_geometric_ratios(logp: Array, old_logp: ArrayLike, mask: Array) -> Float[Array, "P G"]:
    """GSPO weights: `s_i = exp(mean_{t valid} (logp - old_logp))`, the geometric mean of the token
    ratios, i.e. `(pi(y_i) / pi_old(y_i)) ** (1 / |y_i|)` (1 for an empty response)."""
    count = jnp.sum(mask, axis=-1)
    mean_log_ratio = jnp.sum(mask * token_log_ratios(logp, old_logp, mask), axis=-1) / jnp.maximum(count, 1)
    return jnp.exp(mean_log_ratio)


def clipped_surrogate(
    ratio: Array, advantages: Array, *, eps_low: float, eps_high: float, dual_clip: float | None = None
) -> tuple[Array, Array, Array]:
    """Returns the objective to maximise and where the low / high clip is active (bool).

    The low clip binds when `A < 0` and `w < 1 - eps_low`, the high clip when `A > 0` and
    `w > 1 + eps_high`: those are the entries whose gradient the clip removes.
    """
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    objective = jnp.minimum(unclipped, clipped)
    if dual_clip is not None:
        objective = jnp.where(advantages < 0, jnp.maximum(objective, dual_clip * advantages), objective)
    low = (advantages < 0) & (ratio < 1.0 - eps_low)
    high = (advantages > 0) & (ratio > 1.0 + eps_high)
    return objective, low, high


def kl_penalty(logp: Array, ref_logp: ArrayLike, mask: Array, estimator: KLEstimator | str) -> Array:
    """Per-token KL estimate to the reference policy (0 on padding); the reference is constant."""
    estimator = parse_enum(KLEstimator, estimator, "kl_estimator")
    keep = mask > 0
    ref = jax.lax.stop_gradient(jnp.where(keep, ref_logp, 0))
    log_ratio = jnp.where(keep, logp, 0) - ref  # log pi/pi_ref
    if estimator is KLEstimator.K1:
        return log_ratio
    return jnp.expm1(-log_ratio) + log_ratio


def _sequence_weights(mask: Array, mode: LossAgg | str, norm_len: int | None) -> tuple[Array, Array, Array]:
    """Each mode is `sum_seq coef_seq * (token sum of seq) / denominator`: returns
    (coef [P, G], denominator, token count [P, G])."""
    mode = parse_enum(LossAgg, mode, "loss_agg")
    count = jnp.sum(mask, axis=-1)
    present = (count > 0).astype(mask.dtype)
    if mode is LossAgg.TOKEN_MEAN:
        return present, jnp.sum(count), count
    if mode is LossAgg.SEQ_MEAN_TOKEN_MEAN:
        return present / jnp.maximum(count, 1), jnp.sum(present), count
    return present / (mask.shape[-1] if norm_len is None else norm_len), jnp.sum(present), count


def aggregate(
    per_token: Float[Array, "P G T"], mask: Array, mode: LossAgg | str, *, norm_len: int | None = None
) -> tuple[Array, Array]:
    """`(sum, denominator)` of a per-token quantity; padding contributes to neither.

    `norm_len` is the fixed divisor of `seq_mean_token_sum_norm` (default: the padded
    length T, which is the same for every micro-batch of a step).
    """
    coef, denominator, _ = _sequence_weights(mask, mode, norm_len)
    token_sums = jnp.sum(jnp.where(mask > 0, per_token, 0) * mask, axis=-1)
    return jnp.sum(coef * token_sums), denominator


def aggregate_sequences(
    per_seq: Float[Array, "P G"], mask: Array, mode: LossAgg | str, *, norm_len: int | None = None
) -> tuple[Array, Array]:
    """`aggregate` of a quantity that is constant over each response's tokens, without
    spreading it over `[P, G, T]`: the token sum of response i is `count_i * per_seq_i`."""
    coef, denominator, count = _sequence_weights(mask, mode, norm_len)
    return jnp.sum(jnp.where(count > 0, coef * count * per_seq, 0)), denominator


def policy_loss(
    logp: Float[Array, "P G T"],
    old_logp: Float[ArrayLike, "P G T"],
    advantages: Float[ArrayLike, "P G T"] | Float[ArrayLike, "P G"],
    mask: ArrayLike,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
    ratio_level: RatioLevel | str = RatioLevel.TOKEN,
    loss_agg: LossAgg | str = BASE_DEFAULTS["loss_agg"],
    norm_len: int | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator | str = BASE_DEFAULTS["kl_estimator"],
    ref_logp: Float[ArrayLike, "P G T"] | None = None,
    entropy: Float[ArrayLike, "P G T"] | None = None,
    correct: Bool[ArrayLike, "P G"] | None = None,
) -> LossOutput:
    """Clipped policy-gradient loss `-J` (+ `kl_coef * KL`) as a (sum, denominator) pair.

    Token level (Eq. 7): `advantages` is `[P, G, T]` and each token has its own ratio.
    Sequence level (GRPO-S; GSPO with `sequence_geometric`): `advantages` is `[P, G]`, the
    ratio is `sequence_ratios` (`sequence_geometric_ratios`), and each response's objective
    counts as if spread over its tokens (`aggregate_sequences`, computed at `[P, G]`), so that
    `seq_mean_token_mean` gives the papers' `(1/G) sum_i min(ŵ_i Â_i, clip(ŵ_i) Â_i)`.
    `old_logp`, `advantages`, `ref_logp`, `entropy` and `mask` are constants.
    `entropy` and `correct` only feed the diagnostics (entropy of O+ / O- tokens).
    """
    ratio_level = parse_enum(RatioLevel, ratio_level, "ratio_level")
    dtype = float_dtype(logp)
    m = _valid(mask, dtype)
    adv = jax.lax.stop_gradient(jnp.asarray(advantages).astype(dtype))
    log_ratio = token_log_ratios(logp, old_logp, m)
    ratio = jnp.exp(log_ratio)
    clip = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    if ratio_level is RatioLevel.TOKEN:
        s = _token_surrogate(ratio, adv, m, clip, loss_agg, norm_len)
    else:
        ratios = sequence_ratios if ratio_level is RatioLevel.SEQUENCE else sequence_geometric_ratios
        s = _sequence_surrogate(ratios(logp, old_logp, m), adv, m, clip, loss_agg, norm_len)

    diagnostics: Diagnostics = {
        "clip_frac_low": MeanStat.of(s.low.astype(dtype), s.clip_weight),
        "clip_frac_high": MeanStat.of(s.high.astype(dtype), s.clip_weight),
        "ratio_mean": MeanStat.of(ratio, m),
        # k3 estimate of KL(pi_old || pi) from the old policy's samples.
        "approx_kl": MeanStat.of(jnp.expm1(log_ratio) - log_ratio, m),
        "adv_mean": MeanStat.of(s.adv, s.adv_weight),
        "adv_max": MaxStat.of(s.adv, s.adv_weight),
        "adv_min": MinStat.of(s.adv, s.adv_weight),
        **s.extra,
    }
    loss_sum = s.loss_sum
    if kl_coef > 0:
        kl_sum, diagnostics["kl"] = _kl_term(logp, ref_logp, m, kl_coef, kl_estimator, loss_agg, norm_len)
        loss_sum = loss_sum + kl_sum
    if entropy is not None:
        diagnostics.update(_entropy_diagnostics(entropy, correct, m))
    return LossOutput(loss_sum, s.denominator, diagnostics)


class _Surrogate(NamedTuple):
    """The clipped objective of one ratio level, aggregated, and what its diagnostics need."""

    loss_sum: Array
    denominator: Array
    adv: Array  # the advantages, 0 on padding / empty responses
    low: Array  # where the low / high clip binds (bool)
    high: Array
    clip_weight: Array  # weight of each clip decision (token or response)
    adv_weight: Array  # weight of each advantage (tokens it covers)
    extra: Diagnostics


def _token_surrogate(
    ratio: Array, adv: Array, m: Array, clip: dict, loss_agg: LossAgg | str, norm_len: int | None
) -> _Surrogate:
    """Eq. 7: one ratio and one advantage per token."""
    if adv.ndim != m.ndim:
        raise ValueError(f"token-level loss needs advantages shaped like mask {m.shape}, got {adv.shape}")
    adv = jnp.where(m > 0, adv, 0)
    objective, low, high = clipped_surrogate(ratio, adv, **clip)
    loss_sum, denominator = aggregate(-objective, m, loss_agg, norm_len=norm_len)
    return _Surrogate(loss_sum, denominator, adv, low, high, m, m, {})


def _sequence_surrogate(
    seq_ratio: Array, adv: Array, m: Array, clip: dict, loss_agg: LossAgg | str, norm_len: int | None
) -> _Surrogate:
    """GRPO-S / GSPO: one ratio (`seq_ratio`, [P, G]) and one advantage per response."""
    if adv.shape != m.shape[:-1]:
        raise ValueError(f"sequence-level loss needs advantages shaped {m.shape[:-1]}, got {adv.shape}")
    present = (jnp.sum(m, axis=-1) > 0).astype(m.dtype)
    adv = jnp.where(present > 0, adv, 0)
    seq_obj, low, high = clipped_surrogate(seq_ratio, adv, **clip)
    # The response's objective spread over its tokens, so that seq_mean_token_mean is the
    # paper's (1/G) sum_i min(ŵ_i Â_i, clip(ŵ_i) Â_i).
    loss_sum, denominator = aggregate_sequences(-seq_obj, m, loss_agg, norm_len=norm_len)
    # Token-weighted advantage stats: each response's advantage counts once per token.
    extra = {"seq_ratio_mean": MeanStat.of(seq_ratio, present)}
    return _Surrogate(loss_sum, denominator, adv, low, high, present, jnp.sum(m, axis=-1), extra)


def _kl_term(
    logp: Array,
    ref_logp: ArrayLike | None,
    m: Array,
    kl_coef: float,
    estimator: KLEstimator | str,
    loss_agg: LossAgg | str,
    norm_len: int | None,
) -> tuple[Array, MeanStat]:
    """`kl_coef * KL` aggregated like the objective (its sum; the denominator is the same), and
    the mean KL over loss tokens."""
    if ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (the reference policy's log-probs); got None")
    kl = kl_penalty(logp, ref_logp, m, estimator)
    kl_sum, _ = aggregate(kl_coef * kl, m, loss_agg, norm_len=norm_len)
    return kl_sum, MeanStat.of(kl, m)


def _entropy_diagnostics(entropy: ArrayLike, correct: ArrayLike | None, m: Array) -> Diagnostics:
    """Mean entropy over loss tokens, and over the tokens of O+ / O- when `correct` is given."""
    h = jax.lax.stop_gradient(jnp.asarray(entropy).astype(m.dtype))
    out: Diagnostics = {"entropy_mean": MeanStat.of(h, m)}
    if correct is not None:
        pos = jnp.asarray(correct, dtype=bool)[..., None].astype(m.dtype)
        out["entropy_pos"] = MeanStat.of(h, m * pos)
        out["entropy_neg"] = MeanStat.of(h, m * (1 - pos))
    return out
