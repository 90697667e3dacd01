"""Equivalence of two parsed answers (`rewards/answer.py`): exact, symbolic, and a relative
tolerance only for a plain decimal or fraction against an irrational reference. Structure first.

- Forms must match: a VALUE equals a VALUE (a `v = value` answer counts as its value, and its
  variable must be the reference's), LISTs and UNIONs match as multisets (any order), TUPLEs and
  MATRIXes element by element with the same brackets / shape, TEXT by normalised words.
- Values. Both plain rationals (integers, decimals, fractions, mixed numbers, repeating
  decimals): exact equality. Otherwise both are read by math-verify's LaTeX parser (never sympy's
  `parse_expr`, which evaluates Python; decimals are first rewritten as exact fractions) and:
  - a prediction that is a closed form (anything but a plain number or fraction) equals the
    reference only when sympy rewrites their difference to exactly 0 (`expand`, `cancel`, then
    `simplify` only up to 12 operations and 0.5 s: undecided is not equal); nothing is
    evaluated numerically, so `3 + \\exp(-1000)` is not 3, `\\frac{\\pi}{10^{9999}}` is not 0,
    `\\pi + 10^{-12}` is not `\\pi`, and in variables `x^2 + (x-a)(x-b)(x-c)` is not `x^2` wherever it is evaluated;
  - a prediction that is a plain decimal or fraction (an approximation) equals an irrational
    constant reference when `|a - b| <= rel_tol * max(|a|, |b|)` (`1.41421356237` for
    `\\sqrt{2}`); against a rational reference (also one such as `\\log_2 8` that simplifies to
    a rational) it must be exactly equal. So zero equals only exact zero. A reference in
    variables equals a plain number only when it simplifies to it (`\\sin^2 x + \\cos^2 x` = 1).
  - a degree sign against a reference holding `\\pi` is converted (`180^\\circ` = `\\pi`);
    otherwise degrees are a dropped unit (`90^\\circ` = `90`).
- Percentages: `p\\%` equals a plain `v` when `v = p` and `|p| >= 1` (a dataset that dropped
  the % sign: `15\\%` for 15), or when `v = p / 100` and `v` is not an integer (`15\\%` for
  0.15). So `0.5\\%` is not 0.5 and `500\\%` is not 5; `100\\%` is not 1 (ambiguous).
- An EQUATION chain (`9 + 9 = 18`) counts as its last side only if all sides are equal; a
  general equation equals a reference equation when the ratio of their `lhs - rhs` simplifies to
  a non-zero constant.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from gtpo_jax.rewards.answer import Answer, Kind, Value

DEFAULT_REL_TOL = 1e-9
_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
_RATIONAL = [
    (re.compile(rf"(-?)({_NUMBER})"), lambda m: Fraction(m.group(2))),
    (re.compile(rf"(-?)\\frac\{{(-?{_NUMBER})\}}\{{(-?{_NUMBER})\}}"), lambda m: _div(m.group(2), m.group(3))),
    (re.compile(rf"(-?)\(?({_NUMBER})\s*/\s*({_NUMBER})\)?"), lambda m: _div(m.group(2), m.group(3))),
    (
        re.compile(rf"(-?)(\d+)\s*\\frac\{{(\d+)\}}\{{(\d+)\}}"),  # noqa: F541
        lambda m: Fraction(m.group(2)) + _div(m.group(3), m.group(4)),
    ),  # mixed number 1\frac{4}{5}
    (re.compile(r"(-?)(\d*)\.(\d*)\\overline\{(\d{1,20})\}"), lambda m: _repeating(*m.group(2, 3, 4))),
]


def latex_parse(answer: str, timeout_s: int = 3) -> list:
    """math-verify's LaTeX parser only (`[sympy object, string]`, or `[]`); nothing is evaluated."""
    from math_verify import LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=True)]
    return parse(f"${answer}$", extraction_config=config, parsing_timeout=timeout_s)


def _repeating(whole: str, fixed: str, period: str) -> Fraction:
    """`0.1\\overline{6}` = 1/6: the period repeats after the fixed digits."""
    shift = 10 ** len(fixed)
    repeated = Fraction(int(period), shift * (10 ** len(period) - 1))
    return Fraction(int(whole or 0)) + Fraction(int(fixed or 0), shift) + repeated


def _div(a: str, b: str) -> Fraction | None:
    return Fraction(a) / Fraction(b) if Fraction(b) != 0 else None


def canonical(latex: str) -> str:
    """Spacing-free form for string equality: `\\frac12` -> `\\frac{1}{2}`, `52_{8}` -> `52_8`."""
    s = re.sub(r"\s+", "", latex)
    s = re.sub(r"\\(frac|binom)(\w)(\w)", r"\\\1{\2}{\3}", s)
    s = re.sub(r"\\(frac|binom)(\{[^{}]*\})(\w)", r"\\\1\2{\3}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    return re.sub(r"_\{(\w+)\}", r"_\1", s)


def rational(latex: str) -> Fraction | None:
    """The exact value of a plain number, fraction or mixed number, else None."""
    s = canonical(latex)
    for pattern, read in _RATIONAL:
        if m := pattern.fullmatch(s):
            value = read(m)
            return None if value is None else (-value if m.group(1) else value)
    return None


_DECIMAL = re.compile(r"(?<![\d.])(\d*)\.(\d+)(?![\d.])")


def _exact_decimals(latex: str) -> str:
    """Decimals as exact fractions (`4.0001` -> `(\\frac{40001}{10000})`): math-verify's parser
    reads some as 15-digit floats, and `\\sqrt{4.000...01}` must not round to `\\sqrt{4}`."""

    def exact(m: re.Match) -> str:
        return rf"(\frac{{{int((m.group(1) or '0') + m.group(2))}}}{{1{'0' * len(m.group(2))}}})"

    return _DECIMAL.sub(exact, latex)


def _sympy(latex: str):
    """The parsed sympy expression of `latex` (decimals exact), or None (also when it holds a float)."""
    from sympy import Expr, Float

    found = [x for x in latex_parse(_exact_decimals(latex)) if isinstance(x, Expr)]
    if not found or found[0].has(Float) or found[0].has(*_nonfinite()):
        return None
    return found[0]


def _nonfinite():
    from sympy import nan, oo, zoo

    return (oo, -oo, zoo, nan)


MAX_SIMPLIFY_OPS = 12  # `simplify` only below this many operations (the corpus needs <= 5)
SIMPLIFY_SECONDS = 0.5  # and, in a process main thread (a pool worker), only this long (a backstop)


class _SimplifyTimeout(BaseException):  # not an Exception: sympy must not swallow it
    pass


def _bounded_simplify(expr):
    """sympy's `simplify(expr)`, or None when `expr` is too large (`count_ops`) or it runs past
    `SIMPLIFY_SECONDS`: `simplify` has no time limit of its own, and a 15-operation difference
    such as `\\sin(\\sqrt2+\\sqrt3+\\sqrt5)^9 - \\cos(\\sqrt7)^9` takes it over 8 s."""
    import signal
    import threading

    from sympy import count_ops, simplify

    if count_ops(expr) > MAX_SIMPLIFY_OPS:
        return None
    if threading.current_thread() is not threading.main_thread():
        return simplify(expr)

    def expire(signum, frame):
        raise _SimplifyTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, SIMPLIFY_SECONDS)
    try:
        return simplify(expr)
    except _SimplifyTimeout:
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _is_zero(difference) -> bool:
    """True only when sympy rewrites `difference` to exactly 0 (no numeric evaluation: a tiny
    non-zero term such as `\\exp(-1000)` or `10^{-60}\\sqrt{2}` is not zero). `simplify` is
    bounded (`_bounded_simplify`); a difference it cannot decide in time is not zero."""
    from sympy import cancel, expand

    if difference == 0:
        return True
    for rewrite in (expand, cancel, _bounded_simplify):
        if rewrite(difference) == 0:
            return True
    return False


def _same_expression(gold: str, pred: str, rel_tol: float, approximation=None) -> bool:
    """`gold` against `pred` (a closed form), or against `approximation` (the exact value of a plain
    number or fraction the prediction is, compared within `rel_tol` to an irrational gold)."""
    from sympy import Rational

    g = _sympy(gold)
    p = _sympy(pred) if approximation is None else Rational(approximation.numerator, approximation.denominator)
    if g is None or p is None:
        return False
    gold_symbols = {s.name: s for s in g.free_symbols}
    if not {s.name for s in p.free_symbols} <= set(gold_symbols):
        return False
    p = p.xreplace({s: gold_symbols[s.name] for s in p.free_symbols})
    if approximation is not None:  # a decimal (or fraction) against a constant gold
        if g.free_symbols:  # a gold in variables equals a number only when it simplifies to it
            return _is_zero(g - p)  # (`\\sin^2 x + \\cos^2 x` is 1), exactly
        exact = g if g.is_Rational else _bounded_simplify(g)
        if exact is None:
            return False
        if exact.is_Rational:
            return exact == p
        x, y = complex(exact.evalf(50)), complex(p)
        if not all(map(math.isfinite, (x.real, x.imag))):
            return False
        return abs(x - y) <= rel_tol * max(abs(x), abs(y))
    return _is_zero(p - g)


def _percent_equal(q: Fraction, v: Fraction) -> bool:
    """`q\\%` against a plain `v`: the dataset dropped the % sign (`v = q`, only when q >= 1), or
    `v` is the fraction (`v = q / 100`, only when v is not an integer)."""
    return (v == q and abs(q) >= 1) or (v == q / 100 and v.denominator != 1)


def same_value(gold: Value, pred: Value, rel_tol: float = DEFAULT_REL_TOL) -> bool:
    """One reference value against one predicted value (see the module docstring)."""
    same_unit = gold.percent == pred.percent and (gold.degrees == pred.degrees or "\\pi" not in gold.latex)
    if canonical(gold.latex) == canonical(pred.latex) and same_unit:  # (`\\frac{\\pi}{6}^\\circ` is not pi/6)
        return True
    g, p = rational(gold.latex), rational(pred.latex)
    if g is not None and p is not None:
        if gold.percent == pred.percent:
            return g == p
        return _percent_equal(p, g) if pred.percent else _percent_equal(g, p)
    if gold.percent != pred.percent:
        return False  # a percentage of a non-rational value: rare enough to require the same form
    if re.search(r"\d\s*_", gold.latex + " " + pred.latex):
        return False  # base-n numbers (`52_8`) are compared as written
    try:
        if pred.degrees and not gold.degrees and "\\pi" in gold.latex:
            return _same_expression(gold.latex, rf"\frac{{\pi}}{{180}}\cdot({pred.latex})", rel_tol)
        if gold.degrees and not pred.degrees and "\\pi" in pred.latex:
            return _same_expression(rf"\frac{{\pi}}{{180}}\cdot({gold.latex})", pred.latex, rel_tol)
        return _same_expression(gold.latex, pred.latex, rel_tol, approximation=p)
    except (RecursionError, ArithmeticError, ValueError, TypeError, AttributeError):
        return False


def _chain_holds(answer: Answer, rel_tol: float) -> bool:
    items = answer.items
    return all(same_value(items[-1], x, rel_tol) for x in items[:-1])


def _matched(gold: tuple, pred: tuple, same) -> bool:
    """Multiset match: every reference item paired with a distinct equal predicted item."""
    if len(gold) != len(pred):
        return False
    left = list(pred)
    for g in gold:
        hit = next((i for i, p in enumerate(left) if same(g, p)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


def _general_equation(gold: Answer, pred: Answer, rel_tol: float) -> bool:
    """`lhs - rhs` of both in a constant non-zero ratio, decided symbolically."""
    from sympy import cancel

    sides = [_sympy(v.latex) for v in gold.items + pred.items]
    if any(s is None for s in sides):
        return False
    g, p = sides[0] - sides[1], sides[2] - sides[3]
    names = {s.name: s for s in g.free_symbols}
    if not g.free_symbols or not {s.name for s in p.free_symbols} <= set(names):
        return False
    p = p.xreplace({s: names[s.name] for s in p.free_symbols})
    try:
        for rewrite in (cancel, _bounded_simplify):
            ratio = rewrite(p / g)
            if ratio is not None and not ratio.free_symbols:
                return ratio != 0 and ratio.is_finite is True
    except (RecursionError, ArithmeticError, ValueError, TypeError, AttributeError):
        pass
    return False


def equivalent_answers(gold: Answer, pred: Answer, rel_tol: float = DEFAULT_REL_TOL) -> bool:
    """True when `pred` states the same answer as `gold` (both from `parse_answer`)."""
    if gold.variable and pred.variable and gold.variable != pred.variable:
        return False
    if pred.kind == Kind.EQUATION and pred.shape == "chain":
        if not _chain_holds(pred, rel_tol):
            return False
        pred = Answer(Kind.VALUE, pred.items[-1:], variable=pred.variable)
    if gold.kind == Kind.EQUATION and gold.shape == "chain":
        gold = Answer(Kind.VALUE, gold.items[-1:], variable=gold.variable)
    if gold.kind != pred.kind or gold.shape != pred.shape and gold.kind != Kind.EQUATION:
        return False
    if gold.kind == Kind.TEXT:
        return gold.text == pred.text
    if gold.kind == Kind.EQUATION:
        return _general_equation(gold, pred, rel_tol)

    def same(g: Value | Answer, p: Value | Answer) -> bool:
        if isinstance(g, Answer):
            return isinstance(p, Answer) and equivalent_answers(g, p, rel_tol)
        return isinstance(p, Value) and same_value(g, p, rel_tol)

    if gold.kind in (Kind.LIST, Kind.UNION):
        return _matched(gold.items, pred.items, same)
    return len(gold.items) == len(pred.items) and all(map(same, gold.items, pred.items))
