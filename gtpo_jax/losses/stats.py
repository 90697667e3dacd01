"""Masked statistics and accumulable diagnostics shared by the loss module.

Diagnostics are returned as small pytrees (`MeanStat`, `MaxStat`, `MinStat`) rather than
finished floats, so that a trainer can add them up over micro-batches and devices with
`merge_diagnostics` and divide once with `finalize_diagnostics` — the same
(sum, denominator) discipline the loss itself follows.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

E = TypeVar("E", bound=enum.StrEnum)


def parse_enum(enum_cls: type[E], value: str | E, field: str) -> E:
    """Turns a plain string (or a member) into a member of `enum_cls`, naming `field` on error."""
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{field}={value!r} is not a valid choice; expected one of {choices}") from None


def float_dtype(*arrays: ArrayLike) -> jnp.dtype:
    """The floating dtype the loss computes in: float32, or float64 if an input is float64."""
    return jnp.result_type(*arrays, jnp.float32)


def masked_mean_std(x: Array, weight: Array, axis: tuple[int, ...]) -> tuple[Array, Array]:
    """Weighted mean and *population* std of `x` over `axis` (keepdims).

    `weight` is a 0/1 mask; entries with weight 0 must hold finite values (callers sanitise
    them) and contribute nothing. An empty selection gives mean 0 and std 0. Two passes
    (mean, then squared deviations) rather than E[x^2] - E[x]^2, which cancels badly when
    the spread is small next to the mean, as it is for shaped rewards around ±alpha1.
    """
    count = jnp.maximum(jnp.sum(weight, axis=axis, keepdims=True), 1)
    mean = jnp.sum(weight * x, axis=axis, keepdims=True) / count
    var = jnp.sum(weight * jnp.square(x - mean), axis=axis, keepdims=True) / count
    return mean, jnp.sqrt(var)


def safe_divide(num: Array, den: Array) -> Array:
    """`num / den` where `den != 0`, else 0 — for ratios whose denominator is empty."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def sums_over(axis: int | tuple[int, ...], *xs: Array) -> tuple[Array, ...]:
    """Several sums over `axis` (keepdims) in one pass: a variadic reduce, which XLA keeps as a
    single loop instead of re-reading (and recomputing) the inputs once per sum."""
    axes = tuple(a % xs[0].ndim for a in ((axis,) if isinstance(axis, int) else axis))
    zeros = tuple(jnp.zeros((), x.dtype) for x in xs)
    sums = jax.lax.reduce(xs, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)), axes)
    return tuple(jnp.expand_dims(x, axes) for x in sums)


def reciprocal_or_zero(x: Array) -> Array:
    """`1/x`, and 0 where x == 0 (an empty sum; the tokens it would scale are padding)."""
    return safe_divide(jnp.ones_like(x), x)


class MeanStat(NamedTuple):
    """A mean kept as (total, count) so that it adds up exactly over micro-batches."""

    total: Array
    count: Array

    @classmethod
    def of(cls, x: Array, weight: Array) -> MeanStat:
        return cls(jnp.sum(jnp.where(weight > 0, x, 0) * weight), jnp.sum(weight))


class MaxStat(NamedTuple):
    """A maximum over the selected entries (-inf when nothing is selected)."""

    value: Array

    @classmethod
    def of(cls, x: Array, weight: Array) -> MaxStat:
        return cls(jnp.max(jnp.where(weight > 0, x, -jnp.inf)))


class MinStat(NamedTuple):
    """A minimum over the selected entries (+inf when nothing is selected)."""

    value: Array

    @classmethod
    def of(cls, x: Array, weight: Array) -> MinStat:
        return cls(jnp.min(jnp.where(weight > 0, x, jnp.inf)))


Stat = MeanStat | MaxStat | MinStat
Diagnostics = dict[str, Stat]


def merge_diagnostics(a: Mapping[str, Stat], b: Mapping[str, Stat]) -> Diagnostics:
    """Combines the diagnostics of two micro-batches (same keys, same kinds)."""
    if a.keys() != b.keys():
        raise ValueError(f"cannot merge diagnostics with different keys: {sorted(a)} vs {sorted(b)}")
    out: Diagnostics = {}
    for key, x in a.items():
        y = b[key]
        if type(x) is not type(y):
            raise TypeError(f"diagnostic {key!r} is {type(x).__name__} in one batch, {type(y).__name__} in the other")
        if isinstance(x, MeanStat):
            out[key] = MeanStat(x.total + y.total, x.count + y.count)
        elif isinstance(x, MaxStat):
            out[key] = MaxStat(jnp.maximum(x.value, y.value))
        else:
            out[key] = MinStat(jnp.minimum(x.value, y.value))
    return out


def finalize_diagnostics(diagnostics: Mapping[str, Stat]) -> dict[str, float]:
    """Host-side floats: means divided once; an empty mean, max or min becomes NaN."""
    out = {}
    for key, stat in jax.device_get(dict(diagnostics)).items():
        if isinstance(stat, MeanStat):
            out[key] = float(stat.total / stat.count) if stat.count > 0 else float("nan")
        else:
            value = float(stat.value)
            out[key] = value if abs(value) != float("inf") else float("nan")
    return out
