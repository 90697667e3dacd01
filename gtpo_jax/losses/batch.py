"""One rollout batch through the loss: `prepare_batch` (reward shaping, validity, advantages,
loss mask, batch diagnostics) once per rollout, then `compute_loss` per micro-batch of prompts.

    batch, batch_diag = prepare_batch(cfg, rewards=..., mask=..., old_logp=..., entropy=...)
    out = compute_loss(cfg, logp, batch)       # per micro-batch of prompts: (sum, denominator)
    loss = out.loss_sum / out.denominator      # after summing both over micro-batches

The recipe (`cfg.recipe`, `registry.py`) supplies the advantage function and the ratio level;
docs/algorithms.md gives the equations of each recipe.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from gtpo_jax.losses.config import KLEstimator, LossConfig
from gtpo_jax.losses.groups import informative_from_sets, overlong_penalty, success_sets
from gtpo_jax.losses.policy_loss import LossOutput, policy_loss
from gtpo_jax.losses.registry import AdvantageInputs
from gtpo_jax.losses.stats import Diagnostics, MeanStat, float_dtype


class LossBatch(NamedTuple):
    """What the loss needs from one rollout; every leaf leads with P, so micro-batches slice it."""

    mask: Float[Array, "P G T"]  # loss mask: padding, dropped groups and filtered responses are 0
    old_logp: Float[Array, "P G T"]
    advantages: Array  # [P, G, T] (token recipes) or [P, G] (sequence recipes)
    entropy: Float[Array, "P G T"]
    correct: Bool[Array, "P G"]
    ref_logp: Float[Array, "P G T"] | None = None


def prepare_batch(
    cfg: LossConfig,
    *,
    rewards: Float[ArrayLike, "P G"],
    mask: ArrayLike,
    old_logp: Float[ArrayLike, "P G T"],
    entropy: Float[ArrayLike, "P G T"],
    lengths: Int[ArrayLike, "P G"] | None = None,
    truncated: Bool[ArrayLike, "P G"] | None = None,
    ref_logp: Float[ArrayLike, "P G T"] | None = None,
    valid: Bool[ArrayLike, "P G"] | None = None,
    correct: Bool[ArrayLike, "P G"] | None = None,
    informative: Bool[ArrayLike, "P"] | None = None,
) -> tuple[LossBatch, Diagnostics]:
    """Once per rollout batch: reward shaping, advantages, loss mask, batch diagnostics.

    Success (O+ / O-) and informativeness are decided on the verifier's `rewards`; the
    overlong penalty only changes the reward that enters the advantage formulas (for correct
    and wrong responses alike; docs/algorithms.md, "The overlong penalty"). `valid` (`[P, G]`,
    default all) marks responses whose reward is trustworthy: a response whose reward errored,
    timed out or crashed is excluded from its group's statistics and the loss, not scored as
    wrong. Under `mask_truncated`, truncated responses leave the group the same way, *before*
    O+/O- and the statistics are formed.

    `correct` (`[P, G]`) and `informative` (`[P]`), when given, are used as they are (a trainer
    that decided them once on the host hands them over); they must be what is computed when
    they are None: `correct` = reward above `success_threshold`, among the responses that
    remain (valid and, under `mask_truncated`, not truncated); `informative` = groups whose
    remaining responses hold a success and a failure.

    Diagnostics: `_reward_diagnostics` and `_sign_diagnostics`.
    """
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 2 or rewards.shape[1] != cfg.group_size:
        raise ValueError(f"rewards must be [P, G] with G = loss.group_size = {cfg.group_size}; got {rewards.shape}")
    dtype = float_dtype(rewards, entropy)
    ok = jnp.ones(rewards.shape, bool) if valid is None else jnp.asarray(valid, dtype=bool)
    penalty, remaining = _shaping(cfg, rewards.shape, dtype, ok, lengths, truncated)
    correct, informative = _sets(cfg, rewards, remaining, correct, informative)
    m = jnp.asarray(mask).astype(dtype) * remaining[..., None].astype(dtype)
    if cfg.dynamic_sampling:
        m = m * informative[:, None, None].astype(dtype)

    inputs = AdvantageInputs(rewards.astype(dtype), penalty, correct, remaining, jnp.asarray(entropy), m)
    advantages = cfg.recipe.advantages(cfg, inputs)
    diagnostics = {
        **_reward_diagnostics(cfg, rewards.astype(dtype), penalty, ok, informative),
        **_sign_diagnostics(cfg, inputs, advantages, informative),
    }
    batch = LossBatch(
        mask=m,
        old_logp=jnp.asarray(old_logp),
        advantages=advantages,
        entropy=jnp.asarray(entropy),
        correct=correct,
        ref_logp=None if cfg.kl_coef == 0 or ref_logp is None else jnp.asarray(ref_logp),
    )
    return batch, diagnostics


def _sets(
    cfg: LossConfig,
    rewards: Array,
    remaining: Bool[Array, "P G"],
    correct: Bool[ArrayLike, "P G"] | None,
    informative: Bool[ArrayLike, "P"] | None,
) -> tuple[Bool[Array, "P G"], Bool[Array, "P"]]:
    """O+ membership among the remaining responses and the informative groups: as given, or
    decided on the verifier's reward."""
    if correct is None:
        correct = success_sets(rewards, success_threshold=cfg.success_threshold) & remaining
    correct = _checked(correct, rewards.shape, "correct")
    if informative is None:
        informative = informative_from_sets(correct, remaining)
    return correct, _checked(informative, rewards.shape[:1], "informative")


def _checked(x: ArrayLike, shape: tuple[int, ...], name: str) -> Array:
    x = jnp.asarray(x, dtype=bool)
    if x.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {x.shape}")
    return x


def _shaping(
    cfg: LossConfig,
    shape: tuple[int, int],
    dtype: jnp.dtype,
    ok: Bool[Array, "P G"],
    lengths: Int[ArrayLike, "P G"] | None,
    truncated: Bool[ArrayLike, "P G"] | None,
) -> tuple[Float[Array, "P G"], Bool[Array, "P G"]]:
    """DAPO's overlong shaping and filtering: the penalty `[P, G]` (zeros when off) and the
    responses that remain in their group (valid and, under `mask_truncated`, not truncated)."""
    if cfg.overlong_buffer_len > 0 or cfg.mask_truncated:
        if lengths is None:
            raise ValueError("overlong shaping / mask_truncated need the response lengths [P, G]")
        lengths = jnp.asarray(lengths)
    penalty = jnp.zeros(shape, dtype)
    if cfg.overlong_buffer_len > 0:
        penalty = overlong_penalty(
            lengths, max_len=cfg.max_response_len, buffer_len=cfg.overlong_buffer_len, penalty=cfg.overlong_penalty
        ).astype(dtype)
    remaining = ok
    if cfg.mask_truncated:
        if truncated is None:
            if not cfg.max_response_len:
                raise ValueError("mask_truncated needs `truncated` or loss.max_response_len > 0")
            truncated = lengths >= cfg.max_response_len
        remaining = ok & ~jnp.asarray(truncated, dtype=bool)
    return penalty, remaining


def _reward_diagnostics(cfg: LossConfig, rewards: Array, penalty: Array, ok: Array, informative: Array) -> Diagnostics:
    """`informative_frac`, `valid_frac`, the mean verifier and shaped reward over valid responses,
    and `pass_rate` (a truncated correct answer counts as correct: the pass rate is the verifier's)."""
    dtype = rewards.dtype
    scored = ok.astype(dtype)
    return {
        "informative_frac": MeanStat.of(informative.astype(dtype), jnp.ones_like(informative, dtype=dtype)),
        "valid_frac": MeanStat.of(scored, jnp.ones(rewards.shape, dtype)),
        "reward_mean": MeanStat.of(rewards, scored),
        "shaped_reward_mean": MeanStat.of(rewards + penalty, scored),
        "pass_rate": MeanStat.of(
            (success_sets(rewards, success_threshold=cfg.success_threshold) & ok).astype(dtype), scored
        ),
    }


def _sign_diagnostics(cfg: LossConfig, x: AdvantageInputs, advantages: Array, informative: Array) -> Diagnostics:
    """Wrong-sign fractions per set and the size of the entropy shaping, over loss tokens of
    informative groups (a sequence advantage counts once per token of its response).

    `wrong_sign_pos` / `wrong_sign_neg`: the fraction of loss tokens of O+ with `A < 0` and of O-
    with `A > 0` (non-zero under GTPO's paper norm when a group's O+ share leaves
    `(alpha2/(alpha1+alpha2), alpha1/(alpha1+alpha2))`; docs/algorithms.md, "When the paper norm
    flips a sign"). For shaping recipes, `shaping_delta`: the mean `|A - A_unshaped|` over loss
    tokens, where `A_unshaped` is the same recipe with alpha2 = 0 / beta2 = 0 under the *paper*
    norm (DAPO's token-pooled / GRPO's advantage): under another norm it also measures the norm's
    difference."""
    dtype = x.mask.dtype
    per_token = (lambda a: a) if advantages.ndim == 3 else (lambda a: a[..., None])
    weight = x.mask * informative[:, None, None].astype(dtype)
    pos = weight * x.correct[..., None].astype(dtype)
    neg = weight * (x.valid & ~x.correct)[..., None].astype(dtype)
    adv = per_token(advantages)
    out: Diagnostics = {
        "wrong_sign_pos": MeanStat.of(jnp.broadcast_to(adv < 0, pos.shape).astype(dtype), pos),
        "wrong_sign_neg": MeanStat.of(jnp.broadcast_to(adv > 0, neg.shape).astype(dtype), neg),
    }
    if cfg.recipe.unshaped is not None:
        delta = jnp.abs(adv - per_token(cfg.recipe.unshaped(cfg, x)))
        out["shaping_delta"] = MeanStat.of(jnp.broadcast_to(delta, weight.shape), weight)
    return out


def compute_loss(
    cfg: LossConfig, logp: Float[Array, "P G T"], batch: LossBatch, padded_len: int | None = None
) -> LossOutput:
    """The recipe's clipped objective on one micro-batch, as a (sum, denominator) pair.
    `padded_len`: the length T the responses are padded to when the arrays are cropped shorter
    (length buckets): `seq_mean_token_sum_norm`'s default divisor (`norm_len` 0) stays T."""
    return policy_loss(
        logp,
        batch.old_logp,
        batch.advantages,
        batch.mask,
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        dual_clip=cfg.dual_clip if cfg.dual_clip > 0 else None,
        ratio_level=cfg.recipe.ratio_level,
        loss_agg=cfg.loss_agg,
        norm_len=cfg.norm_len or padded_len or None,
        kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator or KLEstimator.K3,
        ref_logp=batch.ref_logp,
        entropy=batch.entropy,
        correct=batch.correct,
    )


def mean_loss(cfg: LossConfig, logp: Float[Array, "P G T"], batch: LossBatch) -> Array:
    """`loss_sum / denominator` of a whole batch (0 when nothing is valid)."""
    out = compute_loss(cfg, logp, batch)
    return out.loss_sum / jnp.maximum(out.denominator, 1)
