"""The countdown task's verifier: reach `target` from the given numbers, each used at most once.

The completion's last `\\boxed{}` expression is parsed by a small recursive-descent parser over
exact fractions (`+ - * /` and parentheses; nothing is evaluated as Python), then checked for
using only the given numbers. The problems themselves are drawn by `data/tasks.py`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from gtpo_jax.rewards.extract import is_plain, last_boxed

MAX_EXPRESSION_CHARS = 200

_TOKEN = re.compile(r"\s*(\d+|[()+\-*/])")


class _Parser:
    """expr := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*; factor := INT | '(' expr ')'."""

    def __init__(self, text: str):
        self.tokens, pos = [], 0
        text = text.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/").replace("×", "*")
        text = text.replace("\\left", "").replace("\\right", "").strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise ValueError(f"unexpected character {text[pos]!r}")
            self.tokens.append(m.group(1))
            pos = m.end()
        self.i, self.numbers = 0, []

    def _peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _next(self) -> str:
        token = self._peek()
        if token is None:
            raise ValueError("unexpected end of expression")
        self.i += 1
        return token

    def expr(self, depth: int = 0) -> Fraction:
        if depth > 50:
            raise ValueError("expression nested too deeply")
        value = self.term(depth)
        while self._peek() in ("+", "-"):
            value = value + self.term(depth) if self._next() == "+" else value - self.term(depth)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self._peek() in ("*", "/"):
            op, rhs = self._next(), self.factor(depth)
            if op == "/" and rhs == 0:
                raise ValueError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor(self, depth: int) -> Fraction:
        token = self._next()
        if token == "(":
            value = self.expr(depth + 1)
            if self._next() != ")":
                raise ValueError("unbalanced parentheses")
            return value
        if token.isdigit():
            self.numbers.append(int(token))
            return Fraction(int(token))
        raise ValueError(f"unexpected token {token!r}")

    def parse(self) -> Fraction:
        value = self.expr()
        if self._peek() is not None:
            raise ValueError(f"unexpected token {self._peek()!r}")
        return value


def check_countdown(expression: str, numbers: list[int], target: int) -> tuple[bool, str]:
    """Whether `expression` uses only the given numbers (each at most once) and equals target."""
    if len(expression) > MAX_EXPRESSION_CHARS or not is_plain(expression):
        return False, "expression too long or not plain"
    try:
        parser = _Parser(expression)
        value = parser.parse()
    except (ValueError, ZeroDivisionError) as e:
        return False, f"unparsable: {e}"
    if Counter(parser.numbers) - Counter(numbers):
        return False, "uses numbers that were not given (or too often)"
    return value == target, "ok" if value == target else f"equals {value}, not {target}"


def countdown_reward(record: Mapping[str, Any], completion: str) -> tuple[float, dict]:
    """1 if the completion's last \\boxed{} expression reaches the target legally, else 0."""
    missing = [k for k in ("numbers", "target") if k not in record]
    if missing:
        raise KeyError(f"countdown reward needs record fields {missing}; the record has fields {sorted(record)}")
    expression = last_boxed(completion)
    if expression is None:
        return 0.0, {"extracted": None}
    ok, why = check_countdown(expression, list(record["numbers"]), int(record["target"]))
    return float(ok), {"extracted": expression[:100], "check": why}
