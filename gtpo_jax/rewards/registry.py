"""Reward name -> function, with the score a failure (timeout, crash, error) receives."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any

from gtpo_jax.data import tasks
from gtpo_jax.rewards import math as math_rewards

RewardFn = Callable[..., tuple[float, dict]]


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """A reward function `(record, completion, **options) -> (score, info)` and its failure score."""

    name: str
    fn: RewardFn
    # Score of an item whose scoring timed out, crashed or raised (DAPO's rule pays -1 for wrong).
    failure_score: float = 0.0


REWARDS: dict[str, RewardSpec] = {}


def register(spec: RewardSpec) -> RewardSpec:
    REWARDS[spec.name] = spec
    return spec


register(RewardSpec("math", math_rewards.math_reward))
register(RewardSpec("dapo", math_rewards.dapo_reward, failure_score=-1.0))
register(RewardSpec("exact", math_rewards.exact_reward))
register(RewardSpec("format", math_rewards.format_reward))
register(RewardSpec("countdown", tasks.countdown_reward))


def get_reward(name: str) -> RewardSpec:
    if name not in REWARDS:
        close = difflib.get_close_matches(name, REWARDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown reward {name!r}{hint} (known: {', '.join(sorted(REWARDS))})")
    return REWARDS[name]


def call_reward(spec: RewardSpec, record: Mapping[str, Any], completion: str, options: Mapping[str, Any]):
    """Runs one reward; an exception becomes the failure score with the error in `info`."""
    try:
        score, info = spec.fn(record, completion, **options)
        return float(score), dict(info)
    except Exception as e:  # model output must never crash the trainer
        return spec.failure_score, {"error": f"{type(e).__name__}: {str(e)[:200]}"}
