"""The loss module: GRPO, DAPO, GTPO and GRPO-S (and the presets RLOO, Dr. GRPO, GSPO) as pure
functions over `[P, G, T]` groups.

docs/algorithms.md states the equations (with the paper's numbers) and the defaults. Layout:
`config.py` (enums, `LossConfig`), `registry.py` (the recipes), `advantages.py` / `groups.py`
(advantage estimators), `variants.py` (the RLOO, Dr. GRPO and GSPO recipes), `policy_loss.py`
(the clipped objective), `batch.py` (`prepare_batch`, `compute_loss`), `stats.py` (masked
statistics, accumulable diagnostics).
"""

from gtpo_jax.errors import ConfigError
from gtpo_jax.losses.advantages import (
    grpo_advantages,
    grpo_s_advantages,
    grpo_s_sequence_rewards_from_sets,
    gtpo_advantages,
    gtpo_token_rewards,
    informative_groups,
    overlong_penalty,
)
from gtpo_jax.losses.batch import LossBatch, compute_loss, mean_loss, prepare_batch
from gtpo_jax.losses.config import (
    RECIPES,
    Algorithm,
    GRPOSNorm,
    GTPONorm,
    KLEstimator,
    LossAgg,
    LossConfig,
    NormScope,
    RatioLevel,
)
from gtpo_jax.losses.policy_loss import LossOutput, policy_loss
from gtpo_jax.losses.registry import Recipe, register
from gtpo_jax.losses.stats import MaxStat, MeanStat, MinStat, finalize_diagnostics, merge_diagnostics
from gtpo_jax.losses.variants import rloo_advantages  # importing it registers rloo, dr_grpo, gspo

__all__ = [
    "RECIPES",
    "Algorithm",
    "ConfigError",
    "GRPOSNorm",
    "GTPONorm",
    "KLEstimator",
    "LossAgg",
    "LossBatch",
    "LossConfig",
    "LossOutput",
    "MaxStat",
    "MeanStat",
    "MinStat",
    "NormScope",
    "RatioLevel",
    "Recipe",
    "compute_loss",
    "finalize_diagnostics",
    "grpo_advantages",
    "grpo_s_advantages",
    "grpo_s_sequence_rewards_from_sets",
    "gtpo_advantages",
    "gtpo_token_rewards",
    "informative_groups",
    "mean_loss",
    "merge_diagnostics",
    "overlong_penalty",
    "policy_loss",
    "prepare_batch",
    "register",
    "rloo_advantages",
]
