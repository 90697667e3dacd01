"""Algorithms as recipes: an advantage function, a ratio level, and default hyperparameters.

GRPO, DAPO, GTPO and GRPO-S are assembled from the same parts (`advantages.py`,
`policy_loss.py`). Adding an algorithm is one advantage function and one `register(Recipe(...))`.

`LossConfig` is the frozen, validated set of hyperparameters. A field left at `None` takes
the recipe's default for the chosen algorithm, so `LossConfig(algorithm="grpo")` is the
published GRPO recipe and `LossConfig(algorithm="gtpo", eps_high=0.3)` changes one value.

Every recipe declares the fields it reads (`Recipe.reads`, some only in a context: the KL
estimator only with `kl_coef > 0`, ...). A field the chosen algorithm does not read resolves
to `None`, and setting it is a `ConfigError` naming the algorithm: no knob is silently ignored.

A step then uses a config through `batch.py` (`prepare_batch`, `compute_loss`).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from jaxtyping import Array, Bool, Float

from gtpo_jax.errors import ConfigError, did_you_mean
from gtpo_jax.losses import advantages as adv_lib
from gtpo_jax.losses.advantages import GRPOSNorm, GTPONorm, NormScope
from gtpo_jax.losses.policy_loss import KLEstimator, LossAgg, RatioLevel
from gtpo_jax.losses.stats import parse_enum


class Algorithm(enum.StrEnum):
    """The built-in recipes (others may be registered under new names)."""

    GRPO = "grpo"
    DAPO = "dapo"
    GTPO = "gtpo"
    GRPO_S = "grpo_s"


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss hyperparameters. `None` = the chosen algorithm's recipe default."""

    # Recipe name: "grpo", "dapo", "gtpo", "grpo_s" (or any registered recipe).
    algorithm: str = Algorithm.GTPO.value
    # G, responses sampled per prompt; group-relative recipes need G >= 2.
    group_size: int | None = None
    # Clip range of the importance weight: [1 - eps_low, 1 + eps_high] (DAPO clip-higher: 0.2 / 0.28).
    eps_low: float | None = None
    eps_high: float | None = None
    # Dual-clip constant c > 1 bounding the objective of negative advantages by c*A; 0 disables.
    dual_clip: float | None = None
    # Aggregation: "token_mean", "seq_mean_token_mean" or "seq_mean_token_sum_norm".
    loss_agg: LossAgg | str | None = None
    # Fixed divisor of seq_mean_token_sum_norm (Dr.GRPO's MAX_TOKENS); 0 = the padded length T.
    norm_len: int | None = None
    # Coefficient of the KL penalty to the reference policy; 0 disables it and the reference pass.
    kl_coef: float | None = None
    # KL estimator: "k1" (log-ratio) or "k3" (exp(ref-logp) - (ref-logp) - 1).
    kl_estimator: KLEstimator | str | None = None
    # A response is a success (in O+) when its verifier reward is above this.
    success_threshold: float | None = None
    # Guards every division (entropies are taken as H + eps, stds as std + eps).
    eps: float | None = None
    # GRPO/DAPO: divide by the group's reward std (False = Dr.GRPO).
    scale_rewards: bool | None = None
    # GTPO Eq. 3/5: weight of the outcome reward and of the entropy-shaped bonus.
    alpha1: float | None = None
    alpha2: float | None = None
    # GTPO normalisation: "paper", "own_set" or "joint"; statistics per "group" or over the "batch".
    gtpo_norm: GTPONorm | str | None = None
    norm_scope: NormScope | str | None = None
    # GRPO-S Eq. 9: weight of the outcome reward and of the entropy-shaped bonus.
    beta1: float | None = None
    beta2: float | None = None
    # GRPO-S normalisation: "paper" or "joint".
    grpo_s_norm: GRPOSNorm | str | None = None
    # DAPO dynamic sampling, loss side: groups whose responses are all right or all wrong are
    # removed from the loss (numerator and denominator). The trainer refills the batch.
    dynamic_sampling: bool | None = None
    # DAPO overlong shaping: linear penalty over the last `overlong_buffer_len` tokens before
    # `max_response_len`, reaching -overlong_penalty at the limit; buffer 0 disables it.
    overlong_buffer_len: int | None = None
    overlong_penalty: float | None = None
    # Length limit of a response in tokens (the sampler's max new tokens); 0 = not given.
    max_response_len: int | None = None
    # DAPO overlong filtering: truncated responses are removed from the loss instead.
    mask_truncated: bool | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in RECIPES:
            raise ConfigError(_unknown(f"loss.algorithm={self.algorithm!r}", self.algorithm, RECIPES))
        recipe = RECIPES[self.algorithm]
        explicit = {f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None} - {"algorithm"}
        for field in dataclasses.fields(self):
            if getattr(self, field.name) is None:
                object.__setattr__(self, field.name, recipe.defaults[field.name])
        for name, enum_cls in _ENUM_FIELDS.items():
            try:
                object.__setattr__(self, name, parse_enum(enum_cls, getattr(self, name), f"loss.{name}"))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        live = recipe.live_fields(self)
        for name in sorted(explicit - live):
            subject = f"loss.{name}={getattr(self, name)!r} is not read by algorithm {self.algorithm!r}"
            if name in recipe.reads:  # read only in a context that is off
                raise ConfigError(f"{subject}{_CONTEXT_WHY[name]}; remove it or change that setting")
            readers = ", ".join(sorted(r for r, rec in RECIPES.items() if name in rec.reads)) or "none"
            raise ConfigError(f"{subject}; remove it, or choose an algorithm that reads it ({readers})")
        for name in {f.name for f in dataclasses.fields(self)} - live - {"algorithm"}:
            object.__setattr__(self, name, None)  # not applicable to this algorithm
        self._validate(recipe)

    def _validate(self, recipe: Recipe) -> None:
        def check(ok: bool, field: str, what: str) -> None:
            if getattr(self, field) is None:  # the field does not apply to this algorithm
                return
            if not ok:
                raise ConfigError(f"loss.{field}={getattr(self, field)!r}: {what}")

        def at_least(name: str, low: float) -> bool:
            value = getattr(self, name)
            return value is None or value >= low

        check(self.group_size >= 1, "group_size", "must be >= 1")
        check(
            not recipe.group_relative or self.group_size >= 2,
            "group_size",
            f"{self.algorithm} compares responses within a group and needs group_size >= 2",
        )
        check(0 <= self.eps_low < 1, "eps_low", "must be in [0, 1)")
        check(self.eps_high >= 0, "eps_high", "must be >= 0")
        check(self.dual_clip == 0 or self.dual_clip > 1, "dual_clip", "must be > 1, or 0 to disable")
        check(at_least("norm_len", 0), "norm_len", "must be >= 0 (0 = padded length)")
        check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        check(self.eps > 0, "eps", "must be > 0")
        for name in ("alpha1", "alpha2", "beta1", "beta2", "overlong_penalty"):
            check(at_least(name, 0), name, "must be >= 0")
        check(self.overlong_buffer_len >= 0, "overlong_buffer_len", "must be >= 0 (0 disables)")
        check(at_least("max_response_len", 0), "max_response_len", "must be >= 0 (0 = not given)")
        if self.overlong_buffer_len > 0:
            check(
                0 < self.overlong_buffer_len <= self.max_response_len,
                "overlong_buffer_len",
                f"needs 0 < overlong_buffer_len <= max_response_len (= {self.max_response_len})",
            )

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.algorithm]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LossConfig:
        """Builds a config from a mapping (e.g. an ml_collections `ConfigDict.to_dict()`).

        An unknown key is an error naming the closest field, so a typo never passes silently.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                raise ConfigError(_unknown(f"field loss.{key}", key, names))
        return cls(**values)


_ENUM_FIELDS: dict[str, type[enum.StrEnum]] = {
    "loss_agg": LossAgg,
    "kl_estimator": KLEstimator,
    "gtpo_norm": GTPONorm,
    "norm_scope": NormScope,
    "grpo_s_norm": GRPOSNorm,
}


def _unknown(subject: str, value: Any, known: Any) -> str:
    return f"unknown {subject}{did_you_mean(value, known)}"


class AdvantageInputs(NamedTuple):
    """What an advantage function sees of one rollout batch (all constants)."""

    rewards: Float[Array, "P G"]  # the verifier's rewards
    penalty: Float[Array, "P G"]  # DAPO overlong penalty (<= 0; zeros when off)
    correct: Bool[Array, "P G"]  # O+ membership, decided on the verifier's reward
    valid: Bool[Array, "P G"]  # responses that belong to their group (see advantages.py)
    entropy: Float[Array, "P G T"]
    mask: Float[Array, "P G T"]  # the loss mask (invalid responses and dropped groups are 0)


AdvantageFn = Callable[[LossConfig, AdvantageInputs], Array]

# Fields every recipe reads (the clipped objective, aggregation, KL, sets, DAPO's shaping).
COMMON_READS = frozenset({
    "group_size", "eps_low", "eps_high", "dual_clip", "loss_agg", "norm_len", "kl_coef", "kl_estimator",
    "success_threshold", "eps", "dynamic_sampling", "overlong_buffer_len", "overlong_penalty",
    "max_response_len", "mask_truncated",
})  # fmt: skip

# Fields read only in a context: name -> (is it read, given the resolved config; why not).
_CONTEXT: dict[str, Callable[[LossConfig], bool]] = {
    "norm_len": lambda c: c.loss_agg is LossAgg.SEQ_MEAN_TOKEN_SUM_NORM,
    "kl_estimator": lambda c: c.kl_coef > 0,
    "overlong_penalty": lambda c: c.overlong_buffer_len > 0,
    "max_response_len": lambda c: c.overlong_buffer_len > 0 or c.mask_truncated,
}
_CONTEXT_WHY = {
    "norm_len": " with this loss_agg (only seq_mean_token_sum_norm divides by it)",
    "kl_estimator": " with kl_coef = 0 (no KL term)",
    "overlong_penalty": " with overlong_buffer_len = 0 (no overlong shaping)",
    "max_response_len": " without overlong shaping or mask_truncated",
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An algorithm: how advantages are made, where the ratio lives, its defaults and the
    config fields it reads."""

    name: str
    advantages: AdvantageFn
    ratio_level: RatioLevel
    # Whether advantages compare responses within a group (then G >= 2 is required).
    group_relative: bool
    defaults: Mapping[str, Any]
    summary: str
    # LossConfig fields the recipe reads beyond `COMMON_READS` (its advantage function's knobs).
    own_reads: frozenset[str] = frozenset()
    # The same recipe with its entropy shaping switched off (alpha2 = 0 / beta2 = 0), for the
    # "shaping is live" diagnostic; None for recipes that do not shape.
    unshaped: AdvantageFn | None = None

    @property
    def reads(self) -> frozenset[str]:
        return COMMON_READS | self.own_reads

    def live_fields(self, cfg: LossConfig) -> set[str]:
        """The fields this recipe reads under `cfg`'s resolved values."""
        return {name for name in self.reads if name not in _CONTEXT or _CONTEXT[name](cfg)}


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Adds a recipe; its defaults must name every `LossConfig` field except `algorithm`."""
    fields = {f.name for f in dataclasses.fields(LossConfig)} - {"algorithm"}
    if set(recipe.defaults) != fields:
        raise ValueError(
            f"recipe {recipe.name!r} defaults must set exactly the LossConfig fields; "
            f"missing {sorted(fields - set(recipe.defaults))}, unknown {sorted(set(recipe.defaults) - fields)}"
        )
    if not recipe.reads <= fields:
        raise ValueError(f"recipe {recipe.name!r} reads unknown fields {sorted(recipe.reads - fields)}")
    RECIPES[recipe.name] = recipe
    return recipe


_COMMON = dict(
    group_size=16,
    dual_clip=0.0,
    norm_len=0,
    kl_estimator="k3",
    success_threshold=0.5,
    eps=1e-6,
    scale_rewards=True,
    alpha1=1.0,
    alpha2=0.1,
    gtpo_norm="paper",
    norm_scope="group",
    beta1=1.0,
    beta2=0.1,
    grpo_s_norm="paper",
    overlong_buffer_len=0,
    overlong_penalty=1.0,
    max_response_len=0,
    mask_truncated=False,
)
# DAPO's changes to GRPO: clip-higher, token-mean, no KL, dynamic sampling.
_DAPO = dict(_COMMON, eps_low=0.2, eps_high=0.28, loss_agg="token_mean", kl_coef=0.0, dynamic_sampling=True)


def _grpo(cfg: LossConfig, x: AdvantageInputs) -> Array:
    return adv_lib.grpo_advantages(
        x.rewards, x.mask, scale_rewards=cfg.scale_rewards, eps=cfg.eps, valid=x.valid, penalty=x.penalty
    )


def _gtpo_with(cfg: LossConfig, x: AdvantageInputs, alpha2: float, norm: GTPONorm) -> Array:
    return adv_lib.gtpo_advantages_from_sets(
        x.rewards, x.correct, x.entropy, x.mask, alpha1=cfg.alpha1, alpha2=alpha2, eps=cfg.eps, norm=norm,
        scope=cfg.norm_scope, valid=x.valid, penalty=x.penalty,
    )  # fmt: skip


def _gtpo(cfg: LossConfig, x: AdvantageInputs) -> Array:
    return _gtpo_with(cfg, x, cfg.alpha2, cfg.gtpo_norm)


def _gtpo_unshaped(cfg: LossConfig, x: AdvantageInputs) -> Array:
    """DAPO's token-pooled advantage of the same sets (alpha2 = 0, the paper's norm)."""
    return _gtpo_with(cfg, x, 0.0, GTPONorm.PAPER)


def _grpo_s_with(cfg: LossConfig, x: AdvantageInputs, beta2: float, norm: GRPOSNorm) -> Array:
    return adv_lib.grpo_s_advantages_from_sets(
        x.rewards, x.correct, x.entropy, x.mask, beta1=cfg.beta1, beta2=beta2, eps=cfg.eps, norm=norm,
        valid=x.valid, penalty=x.penalty,
    )  # fmt: skip


def _grpo_s(cfg: LossConfig, x: AdvantageInputs) -> Array:
    return _grpo_s_with(cfg, x, cfg.beta2, cfg.grpo_s_norm)


def _grpo_s_unshaped(cfg: LossConfig, x: AdvantageInputs) -> Array:
    """GRPO's sequence advantage of the same sets (beta2 = 0)."""
    return _grpo_s_with(cfg, x, 0.0, GRPOSNorm.PAPER)


_GRPO_READS = frozenset({"scale_rewards"})
_GTPO_READS = frozenset({"alpha1", "alpha2", "gtpo_norm", "norm_scope"})
_GRPO_S_READS = frozenset({"beta1", "beta2", "grpo_s_norm"})

register(Recipe(
    "grpo", _grpo, RatioLevel.TOKEN, True,
    dict(_COMMON, eps_low=0.2, eps_high=0.2, loss_agg="seq_mean_token_mean", kl_coef=0.04, dynamic_sampling=False),
    "GRPO (DeepSeekMath): group-normalised outcome reward, symmetric clip, sequence mean, k3 KL 0.04.",
    own_reads=_GRPO_READS,
))  # fmt: skip
register(Recipe(
    "dapo", _grpo, RatioLevel.TOKEN, True, _DAPO,
    "DAPO: GRPO advantages, clip-higher 0.2/0.28, token mean, no KL, dynamic sampling.",
    own_reads=_GRPO_READS,
))  # fmt: skip
register(Recipe(
    "gtpo", _gtpo, RatioLevel.TOKEN, True, _DAPO,
    "GTPO: entropy-shaped token rewards (Eq. 3, 5), per-set normalisation (Eq. 6), DAPO objective (Eq. 7).",
    own_reads=_GTPO_READS, unshaped=_gtpo_unshaped,
))  # fmt: skip
register(Recipe(
    "grpo_s", _grpo_s, RatioLevel.SEQUENCE, True, dict(_DAPO, loss_agg="seq_mean_token_mean"),
    "GRPO-S: entropy-shaped sequence rewards (Eq. 9), mean-of-token-ratios weight, mean over responses.",
    own_reads=_GRPO_S_READS, unshaped=_grpo_s_unshaped,
))  # fmt: skip
