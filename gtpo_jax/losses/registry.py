"""Algorithms as recipes: an advantage function, a ratio level, the fields it reads, and its
defaults (docs/algorithms.md describes the four built-in ones and their equations).

GRPO, DAPO, GTPO and GRPO-S are assembled from the same parts (`advantages.py`,
`policy_loss.py`). Adding an algorithm is one advantage function and one `register(...)`:

    def my_baseline(cfg: LossConfig, x: AdvantageInputs) -> Array: ...   # [P, G, T] (or [P, G])

    register(name="my_baseline", advantages=my_baseline, ratio_level=RatioLevel.TOKEN, doc="...")

(`variants.py` does exactly this for the presets RLOO, Dr. GRPO and GSPO.)

A recipe reads the fields of `OBJECTIVE_READS` (what `prepare_batch` and `compute_loss` read
for every recipe) plus the knobs of its advantage function (`reads=`). Some are read only in
a context (`config.CONTEXT_READS`: the KL estimator only with `kl_coef > 0`, ...). A field the
chosen algorithm does not read resolves to `None`, and setting it is a `ConfigError` naming
the algorithm. Defaults are `config.BASE_DEFAULTS` plus the recipe's differences (`defaults=`).

`register` fills `config.RECIPES`, the table `LossConfig` validates against; this module
imports `config.py`, never the reverse (see `config.py` for why that has no cycle).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from jaxtyping import Array, Bool, Float

from gtpo_jax.errors import ConfigError, did_you_mean
from gtpo_jax.losses.advantages import grpo_advantages, grpo_s_advantages_from_sets, gtpo_advantages_from_sets
from gtpo_jax.losses.config import (
    BASE_DEFAULTS,
    FIELDS,
    RECIPES,
    Algorithm,
    GRPOSNorm,
    GTPONorm,
    LossConfig,
    RatioLevel,
    live_fields,
)
from gtpo_jax.losses.stats import parse_enum


class AdvantageInputs(NamedTuple):
    """What an advantage function sees of one rollout batch (all constants)."""

    rewards: Float[Array, "P G"]  # the verifier's rewards
    penalty: Float[Array, "P G"]  # DAPO overlong penalty (<= 0; zeros when off)
    correct: Bool[Array, "P G"]  # O+ membership, decided on the verifier's reward
    valid: Bool[Array, "P G"]  # responses that belong to their group (see advantages.py)
    entropy: Float[Array, "P G T"]
    mask: Float[Array, "P G T"]  # the loss mask (invalid responses and dropped groups are 0)


AdvantageFn = Callable[[LossConfig, AdvantageInputs], Array]

# Fields every recipe reads: the clipped objective, aggregation and KL (`compute_loss`), the
# group size, success sets and DAPO's shaping and filtering (`prepare_batch`).
OBJECTIVE_READS = frozenset({
    "group_size", "eps_low", "eps_high", "dual_clip", "loss_agg", "norm_len", "kl_coef", "kl_estimator",
    "success_threshold", "dynamic_sampling", "overlong_buffer_len", "overlong_penalty", "max_response_len",
    "mask_truncated",
})  # fmt: skip


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
    """An algorithm: how advantages are made, where the ratio lives, the config fields it reads
    and its defaults. Made by `register`."""

    name: str
    advantages: AdvantageFn
    ratio_level: RatioLevel
    # Every LossConfig field the recipe reads: `OBJECTIVE_READS` and its advantage function's knobs.
    reads: frozenset[str]
    # A value for every field: `BASE_DEFAULTS` with the recipe's differences.
    defaults: Mapping[str, Any]
    doc: str
    # Whether advantages compare responses within a group (then G >= 2 is required).
    group_relative: bool = True
    # The same recipe with its entropy shaping switched off (alpha2 = 0 / beta2 = 0), for the
    # "shaping is live" diagnostic; None for recipes that do not shape.
    unshaped: AdvantageFn | None = None

    def live_fields(self, cfg: LossConfig) -> set[str]:
        """The fields this recipe reads under `cfg`'s resolved values."""
        return live_fields(self.reads, cfg)


def register(
    *,
    name: str,
    advantages: AdvantageFn,
    ratio_level: RatioLevel | str,
    doc: str,
    reads: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    group_relative: bool = True,
    unshaped: AdvantageFn | None = None,
) -> Recipe:
    """Adds the recipe `name` to `RECIPES` and returns it.

    `reads`: the LossConfig fields `advantages` reads beyond `OBJECTIVE_READS`. `defaults`:
    the recipe's differences from `BASE_DEFAULTS`, for fields it reads. The resolved defaults
    are validated as `LossConfig(algorithm=name)`; a bad recipe raises and is not added.
    """
    if name in RECIPES:
        raise ValueError(f"recipe {name!r} is already registered")
    differences = dict(defaults or {})
    _refuse_unknown(name, "reads", set(reads))
    _refuse_unknown(name, "sets defaults for", set(differences))
    all_reads = OBJECTIVE_READS | frozenset(reads)
    if unread := sorted(set(differences) - all_reads):
        raise ValueError(f"recipe {name!r} sets defaults for fields it does not read: {unread}")
    recipe = Recipe(
        name=name,
        advantages=advantages,
        ratio_level=parse_enum(RatioLevel, ratio_level, f"recipe {name!r} ratio_level"),
        reads=all_reads,
        defaults=types.MappingProxyType({**BASE_DEFAULTS, **differences}),
        doc=doc,
        group_relative=group_relative,
        unshaped=unshaped,
    )
    RECIPES[name] = recipe
    try:
        LossConfig(algorithm=name)
    except ConfigError as e:
        del RECIPES[name]
        raise ConfigError(f"recipe {name!r} defaults: {e}") from None
    return recipe


def _refuse_unknown(name: str, what: str, fields: set[str]) -> None:
    """A `ValueError` naming the fields that are not LossConfig fields (with the closest one)."""
    bad = sorted(fields - FIELDS)
    if bad:
        hint = did_you_mean(bad[0], FIELDS, list_known=False)
        raise ValueError(f"recipe {name!r} {what} fields missing from LossConfig: {bad}{hint}")


def _grpo(cfg: LossConfig, x: AdvantageInputs) -> Array:
    return grpo_advantages(
        x.rewards, x.mask, scale_rewards=cfg.scale_rewards, eps=cfg.eps, valid=x.valid, penalty=x.penalty
    )


def _gtpo_with(cfg: LossConfig, x: AdvantageInputs, alpha2: float, norm: GTPONorm) -> Array:
    return gtpo_advantages_from_sets(
        x.rewards,
        x.correct,
        x.entropy,
        x.mask,
        alpha1=cfg.alpha1,
        alpha2=alpha2,
        eps=cfg.eps,
        norm=norm,
        scope=cfg.norm_scope,
        valid=x.valid,
        penalty=x.penalty,
    )


def _gtpo(cfg: LossConfig, x: AdvantageInputs) -> Array:
    return _gtpo_with(cfg, x, cfg.alpha2, cfg.gtpo_norm)


def _gtpo_unshaped(cfg: LossConfig, x: AdvantageInputs) -> Array:
    """DAPO's token-pooled advantage of the same sets (alpha2 = 0, the paper's norm)."""
    return _gtpo_with(cfg, x, 0.0, GTPONorm.PAPER)


def _grpo_s_with(cfg: LossConfig, x: AdvantageInputs, beta2: float, norm: GRPOSNorm) -> Array:
    return grpo_s_advantages_from_sets(
        x.rewards,
        x.correct,
        x.entropy,
        x.mask,
        beta1=cfg.beta1,
        beta2=beta2,
        eps=cfg.eps,
        norm=norm,
        valid=x.valid,
        penalty=x.penalty,
    )


def _grpo_s(cfg: LossConfig, x: AdvantageInputs) -> Array:
    return _grpo_s_with(cfg, x, cfg.beta2, cfg.grpo_s_norm)


def _grpo_s_unshaped(cfg: LossConfig, x: AdvantageInputs) -> Array:
    """GRPO's sequence advantage of the same sets (beta2 = 0)."""
    return _grpo_s_with(cfg, x, 0.0, GRPOSNorm.PAPER)


# The base defaults are DAPO's objective, which GTPO and GRPO-S keep; GRPO differs from it.
register(
    name=Algorithm.GRPO.value,
    advantages=_grpo,
    ratio_level=RatioLevel.TOKEN,
    reads=("scale_rewards", "eps"),
    defaults={"eps_high": 0.2, "loss_agg": "seq_mean_token_mean", "kl_coef": 0.04, "dynamic_sampling": False},
    doc="GRPO (DeepSeekMath): group-normalised outcome reward, symmetric clip, sequence mean, k3 KL 0.04.",
)
register(
    name=Algorithm.DAPO.value,
    advantages=_grpo,
    ratio_level=RatioLevel.TOKEN,
    reads=("scale_rewards", "eps"),
    doc="DAPO: GRPO advantages, clip-higher 0.2/0.28, token mean, no KL, dynamic sampling.",
)
register(
    name=Algorithm.GTPO.value,
    advantages=_gtpo,
    ratio_level=RatioLevel.TOKEN,
    reads=("alpha1", "alpha2", "gtpo_norm", "norm_scope", "eps"),
    doc="GTPO: entropy-shaped token rewards (Eq. 3, 5), per-set normalisation (Eq. 6), DAPO objective (Eq. 7).",
    unshaped=_gtpo_unshaped,
)
register(
    name=Algorithm.GRPO_S.value,
    advantages=_grpo_s,
    ratio_level=RatioLevel.SEQUENCE,
    reads=("beta1", "beta2", "grpo_s_norm", "eps"),
    defaults={"loss_agg": "seq_mean_token_mean"},
    doc="GRPO-S: entropy-shaped sequence rewards (Eq. 9), mean-of-token-ratios weight, mean over responses.",
    unshaped=_grpo_s_unshaped,
)
