"""Errors a user can fix, and the one "did you mean" helper every registry uses.

`ConfigError` is raised for a bad config field, recipe, reward, preset or data file: its message
names the field as the user wrote it (`rollout.top_p=1.5: must be in (0, 1]`). The CLIs print it
as one line and exit with status 1, without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """An invalid setting; the message names the field (or file and line) as the user wrote it."""


def did_you_mean(value: object, known: Iterable[str], *, list_known: bool = True) -> str:
    """`"; did you mean 'x'? (known: a, b, c)"` for a name that is not in `known` (both parts optional)."""
    known = sorted(str(k) for k in known)
    close = difflib.get_close_matches(str(value), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listed = f" (known: {', '.join(known)})" if list_known and known else ""
    return hint + listed


def unknown(subject: str, value: object, known: Iterable[str]) -> ConfigError:
    """`ConfigError("unknown <subject>; did you mean ...? (known: ...)")`."""
    return ConfigError(f"unknown {subject}{did_you_mean(value, known)}")


class UnknownName(ConfigError, KeyError):
    """A name looked up in a registry (reward, model preset, task) that is not there."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""
