"""Reward name -> function, with the score a failure (timeout, crash, error) receives.

A reward declares the record fields it needs (`needs`); the options it takes are its
function's keyword-only parameters. `check_reward` checks both when a run starts, so a
misconfigured reward (an option it does not take, records without the field it reads) stops
the run with a message naming the config field instead of scoring every response as a failure.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gtpo_jax.errors import ConfigError, UnknownName, did_you_mean
from gtpo_jax.rewards import chain, countdown
from gtpo_jax.rewards import math as math_rewards

RewardFn = Callable[..., tuple[float, dict]]


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """A reward function `(record, completion, **options) -> (score, info)` and its failure score."""

    name: str
    fn: RewardFn
    # Score of an item whose scoring timed out, crashed or raised (DAPO's rule pays -1 for wrong).
    # Such items are marked invalid and left out of the loss; the score only fills the slot.
    failure_score: float = 0.0
    # Record fields the function reads.
    needs: tuple[str, ...] = ("answer",)

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword-only parameters of `fn`: the options a config may pass."""
        params = inspect.signature(self.fn).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


REWARDS: dict[str, RewardSpec] = {}


def register(spec: RewardSpec) -> RewardSpec:
    REWARDS[spec.name] = spec
    return spec


register(RewardSpec("math", math_rewards.math_reward))
register(RewardSpec("dapo", math_rewards.dapo_reward, failure_score=-1.0))
register(RewardSpec("exact", math_rewards.exact_reward))
register(RewardSpec("format", math_rewards.format_reward, needs=()))
register(RewardSpec("countdown", countdown.countdown_reward, needs=("numbers", "target")))
register(RewardSpec("chain", chain.chain_reward))


class RewardConfigError(ConfigError):
    """The reward cannot work with the options or records it was given; the message names the field."""


def check_reward(
    spec: RewardSpec, options: Mapping[str, Any], records: Iterable[tuple[str, Mapping[str, Any]]], *, prefix: str
) -> None:
    """Refuses options `spec` does not take (named `<prefix>.<option>`) and the first record, of
    `(where, record)` pairs, lacking a field the reward reads or holding an empty one."""
    for name in options:
        if name not in spec.options:
            takes = ", ".join(spec.options) or "no options"
            raise RewardConfigError(
                f"{prefix}.{name}={options[name]!r} is set but reward {spec.name!r} does not take it "
                f"(it takes: {takes}); remove it or choose another {prefix}.name"
            )
    for where, record in records:
        for field in spec.needs:
            if record.get(field) is None or str(record[field]).strip() == "":
                have = sorted(k for k, v in record.items() if str(v).strip())
                raise RewardConfigError(
                    f"{where}: reward {spec.name!r} needs a non-empty record field {field!r}; the record has "
                    f"{have} (check data.fields and the file)"
                )


def get_reward(name: str) -> RewardSpec:
    if name not in REWARDS:
        raise UnknownName(f"unknown reward {name!r}{did_you_mean(name, REWARDS)}")
    return REWARDS[name]


# What became of one item's scoring (`reward_status`): only OK rewards enter the loss.
OK, ERROR, TIMEOUT, CRASH = 0, 1, 2, 3


def reward_status(info: Mapping[str, Any]) -> int:
    """`OK`, or why the item has no valid reward (`info` as `call_reward` and the pool set it)."""
    if info.get("crashed"):
        return CRASH
    if info.get("timeout"):
        return TIMEOUT
    return ERROR if "error" in info else OK


def call_reward(spec: RewardSpec, record: Mapping[str, Any], completion: str, options: Mapping[str, Any]):
    """Runs one reward; an exception becomes the failure score with the error in `info`."""
    try:
        score, info = spec.fn(record, completion, **options)
        return float(score), dict(info)
    except Exception as e:  # model output must never crash the trainer
        return spec.failure_score, {"error": f"{type(e).__name__}: {str(e)[:200]}"}
