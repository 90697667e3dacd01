"""Three published GRPO variants as registered recipes: RLOO, Dr. GRPO and GSPO.

Each is one advantage function and one `register(...)` (the pattern of `registry.py`); the
recipe functions' docstrings state the published defaults and their source, and
docs/algorithms.md ("Presets") gives the equations. Importing this module registers them;
the package `gtpo_jax.losses` imports it.

Every estimator here follows the rules of `advantages.py`: rewards, mask and penalty are
constants, padding is ignored whatever it holds, and a response that is not `valid` counts in
no statistic and gets advantage 0.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from gtpo_jax.losses.advantages import grpo_advantages
from gtpo_jax.losses.config import Algorithm, LossConfig, RatioLevel
from gtpo_jax.losses.groups import as_constant, valid_or_all
from gtpo_jax.losses.registry import AdvantageInputs, register
from gtpo_jax.losses.stats import float_dtype


def rloo_advantages(
    rewards: Float[ArrayLike, "P G"],
    mask: ArrayLike,
    *,
    valid: Bool[ArrayLike, "P G"] | None = None,
    penalty: Float[ArrayLike, "P G"] | None = None,
) -> Float[Array, "P G T"]:
    """RLOO: `A_i = r_i - mean_{j != i} r_j` over the group's valid responses, broadcast to the
    response's tokens (equal to `n/(n-1) (r_i - mean r)` with `n` valid responses).

    `r_i` includes the overlong `penalty`. A group with fewer than two valid responses (no one
    to leave out) or with all rewards equal gets exactly 0; padding and invalid responses get 0.
    """
    dtype = float_dtype(rewards)
    r = as_constant(rewards, dtype)
    if penalty is not None:
        r = r + as_constant(penalty, dtype)
    v = valid_or_all(valid, r).astype(dtype)
    r = jnp.where(v > 0, r, 0)
    n = jnp.sum(v, axis=-1, keepdims=True)
    baseline = (jnp.sum(r, axis=-1, keepdims=True) - r) / jnp.maximum(n - 1, 1)
    high = jnp.max(jnp.where(v > 0, r, -jnp.inf), axis=-1, keepdims=True)
    same = high == jnp.min(jnp.where(v > 0, r, jnp.inf), axis=-1, keepdims=True)
    adv = jnp.where(same | (n < 2), 0.0, (r - baseline) * v)
    return adv[..., None] * as_constant(mask, dtype)


def rloo(cfg: LossConfig, x: AdvantageInputs) -> Array:
    """RLOO, REINFORCE Leave-One-Out: Ahmadian et al. 2024, "Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs" (arXiv 2402.14740),
    after Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!".

    Published defaults and ours: baseline = the mean reward of the *other* responses of the
    group, no std scaling (`rloo_advantages`); the whole response is the action, so the loss is
    the token *sum* of each response, divided by a constant length (`seq_mean_token_sum_norm`,
    the same direction as the paper's sequence log-prob gradient); one token-level ratio with a
    symmetric PPO clip 0.2 / 0.2 (on-policy, as in the paper, every ratio is 1 and the clip is
    inert); no dynamic sampling. The paper's k (samples per prompt) is 2 or 4; `group_size`
    keeps the base default so runs compare at equal G. The paper's RLHF setting puts a KL
    penalty into the reward; with verifiable rewards it is off here (`kl_coef = 0`).
    """
    del cfg  # reads only the objective's fields
    return rloo_advantages(x.rewards, x.mask, valid=x.valid, penalty=x.penalty)


def dr_grpo(cfg: LossConfig, x: AdvantageInputs) -> Array:
    """Dr. GRPO, "GRPO Done Right": Liu et al. 2025, "Understanding R1-Zero-Like Training: A
    Critical Perspective" (arXiv 2503.20783).

    Published defaults: `A_i = r_i - mean_G(r)`, no division by the group's std (it biases
    towards questions that are too easy or too hard); no division by the response's own length
    either: each response's token sum is divided by a constant (the generation budget,
    `seq_mean_token_sum_norm` with `norm_len`, 0 = the padded length T), then averaged over
    responses; GRPO's symmetric PPO clip 0.2 / 0.2; no KL term (`kl_coef = 0`); no dynamic
    sampling.
    """
    del cfg  # the centring has no knob: scale_rewards and eps are not read
    return grpo_advantages(x.rewards, x.mask, scale_rewards=False, valid=x.valid, penalty=x.penalty)


def gspo(cfg: LossConfig, x: AdvantageInputs) -> Array:
    """GSPO, Group Sequence Policy Optimization: Zheng et al. 2025 (Qwen team), "Group Sequence
    Policy Optimization" (arXiv 2507.18071).

    Published defaults: GRPO's group-normalised advantage `(r_i - mean r) / std r`, one per
    response ([P, G]); the sequence ratio `s_i = (pi(y_i) / pi_old(y_i)) ** (1/|y_i|) =
    exp(mean_t (logp - old_logp))`, the geometric mean of the token ratios
    (`RatioLevel.SEQUENCE_GEOMETRIC`), clipped per response to `[1 - 3e-4, 1 + 4e-4]` (the
    paper's Section 5.1 values, two orders of magnitude below a token clip, because `s_i` is a
    length-normalised ratio); objective `(1/G) sum_i min(s_i A_i, clip(s_i) A_i)`
    (`seq_mean_token_mean` at sequence level); no KL term; no dynamic sampling.
    """
    present = jnp.sum(x.mask, axis=-1, keepdims=True) > 0  # [P, G, 1]: one "token" per response
    adv = grpo_advantages(
        x.rewards, present, scale_rewards=cfg.scale_rewards, eps=cfg.eps, valid=x.valid, penalty=x.penalty
    )
    return adv[..., 0]


# No dynamic sampling and no KL in any of the three papers; each keeps its own clip.
register(
    name=Algorithm.RLOO.value,
    advantages=rloo,
    ratio_level=RatioLevel.TOKEN,
    defaults={"eps_high": 0.2, "loss_agg": "seq_mean_token_sum_norm", "dynamic_sampling": False},
    doc="RLOO (Ahmadian et al. 2024, arXiv 2402.14740): leave-one-out baseline, no std, token sum / constant.",
)
register(
    name=Algorithm.DR_GRPO.value,
    advantages=dr_grpo,
    ratio_level=RatioLevel.TOKEN,
    defaults={"eps_high": 0.2, "loss_agg": "seq_mean_token_sum_norm", "dynamic_sampling": False},
    doc="Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): r - mean(r), token sum / constant length, no KL.",
)
register(
    name=Algorithm.GSPO.value,
    advantages=gspo,
    ratio_level=RatioLevel.SEQUENCE_GEOMETRIC,
    reads=("scale_rewards", "eps"),
    defaults={"eps_low": 3e-4, "eps_high": 4e-4, "loss_agg": "seq_mean_token_mean", "dynamic_sampling": False},
    doc="GSPO (Zheng et al. 2025, arXiv 2507.18071): geometric-mean sequence ratio, sequence clip 3e-4 / 4e-4.",
)
