"""Verifiable rewards for math answers: `(record, completion) -> (score, info)`.

- `math_reward`: the completion's last `\\boxed{}` (or a configured answer pattern) is checked
  against `record["answer"]` for mathematical equivalence with math-verify (HF's verifier),
  through its LaTeX parser only: math-verify's plain-expression path hands text to sympy's
  `parse_expr`, which evaluates Python, and is never used. 1 or 0.
- `dapo_reward`: DAPO's rule: the last `Answer:` line within the final 300 characters, equal to
  the reference after Minerva normalisation. +1 or -1.
- `exact_reward`: normalised string equality of the final answer (synthetic tasks). 1 or 0.
- `format_reward`: 1 when the completion ends with a complete, plain `\\boxed{}` answer.

The answer is only ever taken from the completion, never from the prompt. These functions run
inside `RewardPool` workers, which enforce a hard time limit per item.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gtpo_jax.rewards.extract import answer_line, is_plain, last_boxed, normalize_final_answer, pattern_answer

# Unicode forms that LaTeX parsers do not read, mapped to LaTeX.
_UNICODE_MATH = [(re.compile(r"√\s*(\{[^{}]{0,64}\}|[\w.]{1,64})"), r"\\sqrt{\1}"), (re.compile("−"), "-"),
                 (re.compile("×"), r"\\times "), (re.compile("π"), r"\\pi ")]  # fmt: skip


def gold_answer(record: Mapping[str, Any]) -> str:
    """The reference answer: `record["answer"]`, after `####` for GSM8K-style solutions."""
    if "answer" not in record:
        raise KeyError(f"reward needs record['answer']; the record has fields {sorted(record)}")
    gold = str(record["answer"])
    return gold.rsplit("####", 1)[-1].strip() if "####" in gold else gold.strip()


def to_latex(answer: str) -> str:
    answer = answer.strip().strip("$").strip()
    for pattern, repl in _UNICODE_MATH:
        answer = pattern.sub(repl, answer)
    return re.sub(r"\{\{(.*)\}\}", r"{\1}", answer)


def _latex_parse(answer: str, timeout_s: int) -> list:
    from math_verify import LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=True)]
    return parse(f"${answer}$", extraction_config=config, parsing_timeout=timeout_s)


def equivalent(gold: str, pred: str, *, timeout_s: int = 3) -> bool:
    """Mathematical equivalence of two answer strings (string match first, then math-verify)."""
    from math_verify import verify

    if normalize_final_answer(gold) == normalize_final_answer(pred):
        return True
    gold_parsed, pred_parsed = _latex_parse(to_latex(gold), timeout_s), _latex_parse(to_latex(pred), timeout_s)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))


def final_answer(completion: str, answer_pattern: str | None = None) -> str | None:
    """Last `\\boxed{}` of the completion, else the last match of `answer_pattern`."""
    found = last_boxed(completion)
    if found is None and answer_pattern:
        found = pattern_answer(completion, answer_pattern)
    return found


def math_reward(
    record: Mapping[str, Any], completion: str, *, answer_pattern: str | None = None, timeout_s: int = 3
) -> tuple[float, dict]:
    pred = final_answer(completion, answer_pattern)
    if pred is None:
        return 0.0, {"extracted": None}
    if not is_plain(pred):
        return 0.0, {"extracted": pred[:100], "rejected": "control characters or look-alike digits"}
    return float(equivalent(gold_answer(record), pred, timeout_s=timeout_s)), {"extracted": pred[:100]}


def dapo_reward(record: Mapping[str, Any], completion: str) -> tuple[float, dict]:
    pred = answer_line(completion)
    if pred is None or not is_plain(pred):
        return -1.0, {"extracted": pred}
    correct = normalize_final_answer(pred) == normalize_final_answer(gold_answer(record))
    return (1.0 if correct else -1.0), {"extracted": pred[:100]}


def exact_reward(
    record: Mapping[str, Any], completion: str, *, answer_pattern: str | None = None
) -> tuple[float, dict]:
    pred = final_answer(completion, answer_pattern) or answer_line(completion)
    if pred is None or not is_plain(pred):
        return 0.0, {"extracted": pred}
    return float(normalize_final_answer(pred) == normalize_final_answer(gold_answer(record))), {"extracted": pred[:100]}


def format_reward(record: Mapping[str, Any], completion: str) -> tuple[float, dict]:
    pred = last_boxed(completion)
    ok = pred is not None and pred.strip() != "" and is_plain(pred)
    return float(ok), {"extracted": None if pred is None else pred[:100]}
