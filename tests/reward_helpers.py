"""Module-level reward functions for pool tests (spawned workers import them by name)."""

import time


def slow_echo(record, completion):
    """Sleeps `record["sleep"]` seconds, then scores `record["value"]` (to test attribution)."""
    time.sleep(record["sleep"])
    return float(record["value"]), {"item": record["value"]}
