"""Group-level pieces every advantage estimator shares: the success sets O+ / O-, the
validity of responses, which groups are informative, and DAPO's overlong penalty.

Shapes: `[P, G]` (P prompts, G responses each). See `advantages.py` for how `valid` and the
penalty enter each estimator, and docs/algorithms.md ("Notation", "The overlong penalty").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from gtpo_jax.losses.config import BASE_DEFAULTS
from gtpo_jax.losses.stats import float_dtype


def as_constant(x: ArrayLike, dtype: jnp.dtype) -> Array:
    """`x` in `dtype`, a constant of the loss (no gradient flows into it)."""
    return jax.lax.stop_gradient(jnp.asarray(x).astype(dtype))


def success_sets(
    rewards: Float[ArrayLike, "P G"], *, success_threshold: float = BASE_DEFAULTS["success_threshold"]
) -> Bool[Array, "P G"]:
    """`True` for responses in O+ (reward strictly above `success_threshold`)."""
    return jnp.asarray(rewards) > success_threshold


def valid_or_all(valid: Bool[ArrayLike, "P G"] | None, like: ArrayLike) -> Bool[Array, "P G"]:
    """`valid` as bool, or every response of `like` ([P, G]) when None."""
    return jnp.ones(jnp.shape(like), bool) if valid is None else jnp.asarray(valid, dtype=bool)


def informative_from_sets(
    correct: Bool[ArrayLike, "P G"], valid: Bool[ArrayLike, "P G"] | None = None
) -> Bool[Array, "P"]:
    """Groups whose valid responses hold at least one success and one failure (`n > 0`, `m > 0`)."""
    correct = jnp.asarray(correct, dtype=bool)
    valid = valid_or_all(valid, correct)
    return jnp.any(correct & valid, axis=-1) & jnp.any(~correct & valid, axis=-1)


def informative_groups(
    rewards: Float[ArrayLike, "P G"], *, success_threshold: float = BASE_DEFAULTS["success_threshold"]
) -> Bool[Array, "P"]:
    """DAPO dynamic sampling's keep-decision: does the group mix successes and failures?

    Decided on correctness (reward above `success_threshold`), never on a shaped reward: a
    group of all-correct responses with different overlong penalties is still uninformative.
    """
    return informative_from_sets(success_sets(rewards, success_threshold=success_threshold))


def overlong_penalty(
    lengths: Int[ArrayLike, "P G"], *, max_len: int, buffer_len: int, penalty: float = BASE_DEFAULTS["overlong_penalty"]
) -> Float[Array, "P G"]:
    """DAPO's soft overlong punishment, counted in tokens (a value <= 0 to add to the reward).

    0 up to `max_len - buffer_len` tokens, then falling linearly to `-penalty` at `max_len`
    (and staying there beyond it).
    """
    if not buffer_len > 0:
        raise ValueError(f"buffer_len={buffer_len!r}: must be > 0 (set it to 0 in the config to disable the penalty)")
    if not buffer_len <= max_len:
        raise ValueError(f"buffer_len={buffer_len!r} must not exceed max_len={max_len!r}")
    lengths = jnp.asarray(lengths)
    excess = (lengths - (max_len - buffer_len)).astype(float_dtype(lengths)) / buffer_len
    return -penalty * jnp.clip(excess, 0.0, 1.0)
