"""The chain task's verifier: only the final answer, the integer after the completion's last `>`.

The intermediate steps (`7+5=12,12-3=9`) are not checked: a response is rewarded for reaching
the right answer, whatever path it wrote. Anything else after the last `>` (no `>`, no integer,
extra text) scores 0; nothing raises. The problems are drawn by `data/tasks.py`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_ANSWER = re.compile(r"\s*(-?\d{1,18})\s*")


def final_answer(completion: str) -> int | None:
    """The integer after the last `>` of `completion`, or None when there is none or it is malformed."""
    head, sep, tail = completion.rpartition(">")
    m = _ANSWER.fullmatch(tail) if sep else None
    return int(m.group(1)) if m else None


def chain_reward(record: Mapping[str, Any], completion: str) -> tuple[float, dict]:
    """1 if the integer after the completion's last `>` equals the record's `answer`, else 0."""
    got = final_answer(completion)
    if got is None:
        return 0.0, {"extracted": None}
    try:
        ok = got == int(str(record["answer"]).strip())
    except ValueError:
        return 0.0, {"extracted": str(got), "error_answer": str(record["answer"])[:50]}
    return float(ok), {"extracted": str(got)}
