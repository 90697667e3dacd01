"""The loss's settings: its enums, the base defaults, and `LossConfig`, the frozen, validated
set of hyperparameters (docs/algorithms.md names each choice and its default).

A `LossConfig` field left at `None` takes the chosen algorithm's recipe default, so
`LossConfig(algorithm="grpo")` is the published GRPO recipe and
`LossConfig(algorithm="gtpo", eps_high=0.3)` changes one value. A field the algorithm does
not read resolves to `None`, and setting it is a `ConfigError` naming the algorithm: no knob
is silently ignored.

How this module and `registry.py` avoid an import cycle: validating a config needs the
recipes (their defaults and the fields they read), and a recipe needs `LossConfig`. The
table of recipes, `RECIPES`, is a plain dict defined *here*, typed by the small
`RecipeSpec` protocol (what validation reads of a recipe); `registry.py` imports this module
and fills the table with `register(...)`. This module imports nothing from the registry.
The package `gtpo_jax.losses` imports `registry.py`, so the table is filled whenever the
loss module is imported.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from gtpo_jax.errors import ConfigError, unknown
from gtpo_jax.losses.stats import parse_enum


class Algorithm(enum.StrEnum):
    """The built-in recipes (others may be registered under new names)."""

    GRPO = "grpo"
    DAPO = "dapo"
    GTPO = "gtpo"
    GRPO_S = "grpo_s"
    RLOO = "rloo"  # leave-one-out baseline (`variants.py`)
    DR_GRPO = "dr_grpo"  # GRPO without std scaling, constant-length aggregation (`variants.py`)
    GSPO = "gspo"  # sequence-level geometric-mean ratio and clip (`variants.py`)


class LossAgg(enum.StrEnum):
    """How per-token losses become one number (its denominator is in the name)."""

    TOKEN_MEAN = "token_mean"  # / number of valid tokens (DAPO, GTPO)
    SEQ_MEAN_TOKEN_MEAN = "seq_mean_token_mean"  # mean over tokens, then / number of responses (GRPO)
    SEQ_MEAN_TOKEN_SUM_NORM = "seq_mean_token_sum_norm"  # token sum / fixed length, then / responses (Dr.GRPO)


class KLEstimator(enum.StrEnum):
    """Estimator of KL(pi || pi_ref) from samples of pi."""

    K1 = "k1"
    K3 = "k3"


class RatioLevel(enum.StrEnum):
    """Where the importance weight lives."""

    TOKEN = "token"  # one ratio per token (GRPO, DAPO, GTPO; Eq. 7)
    SEQUENCE = "sequence"  # one ratio per response, the mean of its token ratios (GRPO-S)
    # one ratio per response, the geometric mean of its token ratios, exp(mean_t log w) (GSPO)
    SEQUENCE_GEOMETRIC = "sequence_geometric"


class GTPONorm(enum.StrEnum):
    """How GTPO normalises the shaped token rewards of O+ and O- (Eq. 6)."""

    PAPER = "paper"  # each set's statistics over all valid tokens, 0 on the other set's tokens
    OWN_SET = "own_set"  # each set's statistics over its own tokens only
    JOINT = "joint"  # one mean/std over both sets' shaped rewards


class NormScope(enum.StrEnum):
    """Which tokens GTPO's normalisation statistics are taken over."""

    GROUP = "group"  # per prompt (default)
    BATCH = "batch"  # over every informative group of the batch


class GRPOSNorm(enum.StrEnum):
    """How GRPO-S normalises the shaped sequence rewards."""

    PAPER = "paper"  # separately for O+ and O-, over all G responses with 0 on the other set
    JOINT = "joint"  # one mean/std over all G shaped rewards


# The one place default values are written. A recipe states only its differences from these
# (`registry.py`); the pure functions of `advantages.py` take their keyword defaults from here.
# The objective is DAPO's, which GTPO and GRPO-S keep (Eq. 7).
BASE_DEFAULTS: Mapping[str, Any] = types.MappingProxyType({
    "group_size": 16,
    "eps_low": 0.2,  # DAPO clip-higher: [1 - 0.2, 1 + 0.28]
    "eps_high": 0.28,
    "dual_clip": 0.0,  # off
    "loss_agg": "token_mean",
    "norm_len": 0,  # 0 = the padded length T
    "kl_coef": 0.0,  # no KL term, no reference pass
    "kl_estimator": "k3",
    "success_threshold": 0.5,  # binary 1/0 rewards
    "eps": 1e-6,
    "scale_rewards": True,  # GRPO divides by the group's std (False = Dr.GRPO)
    "alpha1": 1.0,  # the paper's experimental values (Eq. 3, 5)
    "alpha2": 0.1,
    "gtpo_norm": "paper",
    "norm_scope": "group",
    "beta1": 1.0,  # the paper's experimental values (Eq. 9)
    "beta2": 0.1,
    "grpo_s_norm": "paper",
    "dynamic_sampling": True,
    "overlong_buffer_len": 0,  # overlong shaping off
    "overlong_penalty": 1.0,
    "max_response_len": 0,  # not given
    "mask_truncated": False,
})  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss hyperparameters. `None` = the chosen algorithm's recipe default."""

    # Recipe name: "grpo", "dapo", "gtpo", "grpo_s", "rloo", "dr_grpo", "gspo" (or any registered recipe).
    algorithm: str = Algorithm.GTPO.value
    # G, responses sampled per prompt; group-relative recipes need G >= 2.
    group_size: int | None = None
    # Clip range of the importance weight: [1 - eps_low, 1 + eps_high] (DAPO clip-higher: 0.2 / 0.28).
    eps_low: float | None = None
    eps_high: float | None = None
    # Dual-clip constant c > 1 bounding the objective of negative advantages by c*A; 0 disables.
    dual_clip: float | None = None
    # Aggregation: "token_mean", "seq_mean_token_mean" or "seq_mean_token_sum_norm" (each response's
    # token sum / norm_len, then the mean over responses: Dr.GRPO, RLOO).
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
    # GRPO/DAPO/GSPO: divide by the group's reward std (False = Dr.GRPO's advantage).
    scale_rewards: bool | None = None
    # GTPO Eq. 3/5: weight of the outcome reward and of the entropy-shaped bonus.
    alpha1: float | None = None
    alpha2: float | None = None
    # GTPO normalisation (Eq. 6): "paper", "own_set" or "joint"; statistics per "group" or over the "batch".
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
            raise unknown(f"loss.algorithm={self.algorithm!r}", self.algorithm, RECIPES)
        recipe = RECIPES[self.algorithm]
        explicit = {name for name in FIELDS if getattr(self, name) is not None}
        for name in FIELDS:
            value = getattr(self, name)
            if value is None:
                value = recipe.defaults[name]
            if name in _ENUM_FIELDS:
                try:
                    value = parse_enum(_ENUM_FIELDS[name], value, f"loss.{name}")
                except ValueError as e:
                    raise ConfigError(str(e)) from None
            object.__setattr__(self, name, value)
        live = live_fields(recipe.reads, self)
        _refuse_unread(self, recipe, explicit - live)
        for name in FIELDS - live:
            object.__setattr__(self, name, None)  # not applicable to this algorithm
        _check_values(self, recipe)

    @property
    def recipe(self) -> Any:
        """The registered recipe of `algorithm` (a `registry.Recipe`)."""
        return RECIPES[self.algorithm]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LossConfig:
        """Builds a config from a mapping (e.g. an ml_collections `ConfigDict.to_dict()`).

        An unknown key is an error naming the closest field, so a typo never passes silently.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                raise unknown(f"field loss.{key}", key, names)
        return cls(**values)


# Every hyperparameter, i.e. every LossConfig field but `algorithm`.
FIELDS = frozenset(f.name for f in dataclasses.fields(LossConfig)) - {"algorithm"}

_ENUM_FIELDS: dict[str, type[enum.StrEnum]] = {
    "loss_agg": LossAgg,
    "kl_estimator": KLEstimator,
    "gtpo_norm": GTPONorm,
    "norm_scope": NormScope,
    "grpo_s_norm": GRPOSNorm,
}

# Fields read only in a context: name -> (is it read, given the resolved config; why not otherwise).
CONTEXT_READS: dict[str, tuple[Callable[[LossConfig], bool], str]] = {
    "norm_len": (
        lambda c: c.loss_agg is LossAgg.SEQ_MEAN_TOKEN_SUM_NORM,
        " with this loss_agg (only seq_mean_token_sum_norm divides by it)",
    ),
    "kl_estimator": (lambda c: c.kl_coef > 0, " with kl_coef = 0 (no KL term)"),
    "overlong_penalty": (lambda c: c.overlong_buffer_len > 0, " with overlong_buffer_len = 0 (no overlong shaping)"),
    "max_response_len": (
        lambda c: c.overlong_buffer_len > 0 or c.mask_truncated,
        " without overlong shaping or mask_truncated",
    ),
}


def live_fields(reads: frozenset[str], cfg: LossConfig) -> set[str]:
    """The fields of `reads` that are read under `cfg`'s resolved values (see `CONTEXT_READS`)."""
    return {name for name in reads if name not in CONTEXT_READS or CONTEXT_READS[name][0](cfg)}


class RecipeSpec(Protocol):
    """What validating a `LossConfig` reads of a recipe (`registry.Recipe` is the implementation)."""

    name: str
    reads: frozenset[str]  # every field the recipe reads, some only in a context (`CONTEXT_READS`)
    defaults: Mapping[str, Any]  # a value for every field in `FIELDS`
    group_relative: bool  # advantages compare responses within a group (then G >= 2)


# The registered recipes, name -> recipe. Filled by `registry.register`; see the module docstring.
RECIPES: dict[str, RecipeSpec] = {}


def _refuse_unread(cfg: LossConfig, recipe: RecipeSpec, unread: set[str]) -> None:
    """A `ConfigError` for the first explicitly set field that `recipe` does not read under `cfg`."""
    for name in sorted(unread):
        subject = f"loss.{name}={getattr(cfg, name)!r} is not read by algorithm {cfg.algorithm!r}"
        if name in recipe.reads:  # read only in a context that is off
            raise ConfigError(f"{subject}{CONTEXT_READS[name][1]}; remove it or change that setting")
        readers = ", ".join(sorted(r for r, rec in RECIPES.items() if name in rec.reads)) or "none"
        raise ConfigError(f"{subject}; remove it, or choose an algorithm that reads it ({readers})")


def _check_values(cfg: LossConfig, recipe: RecipeSpec) -> None:
    """Range checks of the resolved values; a field resolved to `None` does not apply."""

    def check(ok: Callable[[Any], bool], field: str, what: str) -> None:
        value = getattr(cfg, field)
        if value is not None and not ok(value):
            raise ConfigError(f"loss.{field}={value!r}: {what}")

    check(lambda g: g >= 1, "group_size", "must be >= 1")
    check(
        lambda g: not recipe.group_relative or g >= 2,
        "group_size",
        f"{cfg.algorithm} compares responses within a group and needs group_size >= 2",
    )
    check(lambda e: 0 <= e < 1, "eps_low", "must be in [0, 1)")
    check(lambda e: e >= 0, "eps_high", "must be >= 0")
    check(lambda c: c == 0 or c > 1, "dual_clip", "must be > 1, or 0 to disable")
    check(lambda n: n >= 0, "norm_len", "must be >= 0 (0 = padded length)")
    check(lambda k: k >= 0, "kl_coef", "must be >= 0")
    check(lambda e: e > 0, "eps", "must be > 0")
    for name in ("alpha1", "alpha2", "beta1", "beta2", "overlong_penalty"):
        check(lambda w: w >= 0, name, "must be >= 0")
    check(lambda b: b >= 0, "overlong_buffer_len", "must be >= 0 (0 disables)")
    check(lambda n: n >= 0, "max_response_len", "must be >= 0 (0 = not given)")
    if cfg.overlong_buffer_len > 0:
        check(
            lambda b: 0 < b <= cfg.max_response_len,
            "overlong_buffer_len",
            f"needs 0 < overlong_buffer_len <= max_response_len (= {cfg.max_response_len})",
        )
