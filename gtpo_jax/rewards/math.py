"""Verifiable rewards for math answers: `(record, completion) -> (score, info)`.

- `math_reward`: the completion's last `\\boxed{}` (else a configured answer pattern, else a
  GSM8K-style `#### N` final line) is checked against `record["answer"]`. Strict mode (the
  default) first parses it with the answer grammar of `rewards/answer.py`, which rejects extra
  words, several candidates, hiding or colour commands and relations that do not hold, then
  compares with `rewards/equivalence.py` (exact rationals, relative tolerance `rel_tol`); the
  box itself must be the one answer shown (`extract.boxed_hedge`: no differing boxes, no sign
  before it, no exponent, operator or `or` after it, nor a hedge in the next 2 lines; markdown
  around it is allowed, and a degree mark after it, `\\boxed{30}^\\circ`, reads as `30^\\circ`).
  `strict=False` is the former lenient check: math-verify (HF's verifier) equivalence. Either
  way only math-verify's LaTeX parser is used: its plain-expression path hands text to sympy's
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

from gtpo_jax.rewards.answer import _DEGREES, Rejected, normalize, parse_answer
from gtpo_jax.rewards.equivalence import DEFAULT_REL_TOL, canonical, equivalent_answers, latex_parse
from gtpo_jax.rewards.extract import (
    answer_line,
    boxed_hedge,
    boxed_in_degrees,
    is_plain,
    last_boxed,
    normalize_final_answer,
    pattern_answer,
)

GSM8K_FINAL_LINE = r"(?m)^[ \t]*####[ \t]*(\S[^\n]{0,63}?)[ \t]*$"

# Unicode forms that LaTeX parsers do not read, mapped to LaTeX.
_UNICODE_MATH = [(re.compile(r"√\s*(\{[^{}]{0,64}\}|[\w.]{1,64})"), r"\\sqrt{\1}"), (re.compile("−"), "-"),
                 (re.compile("×"), r"\\times "), (re.compile("π"), r"\\pi ")]  # fmt: skip


def gold_answer(record: Mapping[str, Any]) -> str:
    """The reference answer: `record["answer"]`, after `####` for GSM8K-style solutions."""
    if "answer" not in record:
        raise KeyError(f"reward needs record['answer']; the record has fields {sorted(record)}")
    gold = str(record["answer"])
    return gold.rsplit("####", 1)[-1].strip() if "####" in gold else gold.strip()


def unicode_to_latex(answer: str) -> str:
    """`√2`, `−`, `×`, `π` as LaTeX; surrounding `$` and spaces stripped."""
    answer = answer.strip().strip("$").strip()
    for pattern, repl in _UNICODE_MATH:
        answer = pattern.sub(repl, answer)
    return answer


def to_latex(answer: str) -> str:
    return re.sub(r"\{\{(.*)\}\}", r"{\1}", unicode_to_latex(answer))


def equivalent(gold: str, pred: str, *, timeout_s: int = 3) -> bool:
    """Mathematical equivalence of two answer strings (string match first, then math-verify)."""
    from math_verify import verify

    if normalize_final_answer(gold) == normalize_final_answer(pred):
        return True
    gold_parsed, pred_parsed = latex_parse(to_latex(gold), timeout_s), latex_parse(to_latex(pred), timeout_s)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))


def strict_equivalent(gold: str, pred: str, *, rel_tol: float = DEFAULT_REL_TOL) -> tuple[bool, str | None]:
    """(correct, why rejected): `pred` parsed by the answer grammar against the parsed `gold`.

    A prediction that is the reference's own text (up to spacing) is correct. A reference the
    grammar cannot read (rare; e.g. `n!`) is compared only that way.
    """
    gold, pred = unicode_to_latex(gold), unicode_to_latex(pred)
    if canonical(normalize(gold)) == canonical(normalize(pred)):
        return True, None
    try:
        reference = parse_answer(gold)
    except Rejected as e:
        return False, f"reference {gold[:60]!r} is outside the answer grammar ({e}); only its exact text is accepted"
    try:
        answer = parse_answer(pred, reference)
        return equivalent_answers(reference, answer, rel_tol), None
    except Rejected as e:
        return False, str(e)
    except (RecursionError, ArithmeticError, MemoryError) as e:  # `\Gamma(10^{9999})` and the like
        return False, f"cannot be evaluated safely ({type(e).__name__})"


def final_answer(completion: str, answer_pattern: str | None = None) -> str | None:
    """Last `\\boxed{}` of the completion, else the last match of `answer_pattern`."""
    found = last_boxed(completion)
    if found is None and answer_pattern:
        found = pattern_answer(completion, answer_pattern)
    return found


def math_reward(
    record: Mapping[str, Any],
    completion: str,
    *,
    answer_pattern: str | None = None,
    timeout_s: int = 3,
    strict: bool = True,
    rel_tol: float = DEFAULT_REL_TOL,
) -> tuple[float, dict]:
    """1 when the final answer equals `record["answer"]`, else 0; `info["rejected"]` says why a
    strict-mode answer was refused before comparison."""
    pred = final_answer(completion, answer_pattern) or pattern_answer(completion, GSM8K_FINAL_LINE)
    if pred is None:
        return 0.0, {"extracted": None}
    if not is_plain(pred):
        return 0.0, {"extracted": pred[:100], "rejected": "control characters or look-alike digits"}
    if not strict:
        return float(equivalent(gold_answer(record), pred, timeout_s=timeout_s)), {"extracted": pred[:100]}
    if last_boxed(completion) is not None and (hedge := boxed_hedge(completion)):
        return 0.0, {"extracted": pred[:100], "rejected": hedge}
    if last_boxed(completion) is not None and boxed_in_degrees(completion) and not _DEGREES.search(pred):
        pred = f"{{{pred}}}^\\circ"  # boxed{30}^circ: degrees, as in the box
    correct, why = strict_equivalent(gold_answer(record), pred, rel_tol=rel_tol)
    return float(correct), {"extracted": pred[:100]} | ({"rejected": why} if why else {})


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
