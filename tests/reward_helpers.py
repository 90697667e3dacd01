"""Module-level reward functions for pool tests (spawned workers import them by name)."""

import time


def slow_echo(record, completion):
    """Sleeps `record["sleep"]` seconds, then scores `record["value"]` (to test attribution)."""
    time.sleep(record["sleep"])
    return float(record["value"]), {"item": record["value"]}


def fails_on_odd_length(record, completion):
    """Raises for completions of odd length (a verifier bug on some outputs), else 1 if even."""
    if len(completion) % 2:
        raise ValueError(f"cannot parse {completion!r}")
    return 1.0, {}


def always_fails(record, completion):
    raise RuntimeError("verifier is broken")
