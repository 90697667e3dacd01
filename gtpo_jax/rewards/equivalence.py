"""Equivalence of two parsed answers (`rewards/answer.py`): exact for rationals, relative tolerance
for everything else, structure first.

- Forms must match: a VALUE equals a VALUE (a `v = value` answer counts as its value, and its
  variable must be the reference's), LISTs and UNIONs match as multisets (any order), TUPLEs and
  MATRIXes element by element with the same brackets / shape, TEXT by normalised words.
- Values: integers, decimals, fractions and mixed numbers are compared exactly as fractions; a
  percentage `p\\%` equals a reference `p` or `p / 100`. Other values are read by math-verify's
  LaTeX parser (never sympy's `parse_expr`, which evaluates Python) and compared numerically to
  50 digits: `|a - b| <= rel_tol * max(|a|, |b|)`, at three fixed points when they have variables
  (the prediction's variables must be among the reference's). Zero is only equal to zero, and
  a rational reference only to an equal rational (or a closed form agreeing to 45 digits).
- An EQUATION chain (`9 + 9 = 18`) counts as its last side only if all sides are equal; a
  general equation equals a reference equation when `lhs - rhs` of each differ by a constant factor.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from gtpo_jax.rewards.answer import Answer, Kind, Value

DEFAULT_REL_TOL = 1e-9
_EXACT_DIGITS = 50  # digits to which a non-rational form of a rational reference must agree
_POINTS = ("0.5772156649", "1.6180339887", "-0.7071067812")  # irrational-looking, away from roots
_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
_RATIONAL = [
    (re.compile(rf"(-?)({_NUMBER})"), lambda m: Fraction(m.group(2))),
    (re.compile(rf"(-?)\\frac\{{(-?{_NUMBER})\}}\{{(-?{_NUMBER})\}}"), lambda m: _div(m.group(2), m.group(3))),
    (re.compile(rf"(-?)\(?({_NUMBER})\s*/\s*({_NUMBER})\)?"), lambda m: _div(m.group(2), m.group(3))),
    (re.compile(rf"(-?)(\d+)\s*\\frac\{{(\d+)\}}\{{(\d+)\}}"),  # noqa: F541
     lambda m: Fraction(m.group(2)) + _div(m.group(3), m.group(4))),  # mixed number 1\frac{4}{5}
    (re.compile(r"(-?)(\d*)\.(\d*)\\overline\{(\d{1,20})\}"), lambda m: _repeating(*m.group(2, 3, 4))),
]  # fmt: skip


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


def _sympy(latex: str):
    from sympy import Basic

    from gtpo_jax.rewards.math import latex_parse

    found = [x for x in latex_parse(latex) if isinstance(x, Basic)]
    return found[0] if found else None


def _close(a, b, rel_tol: float) -> bool:
    """Numeric equality of two constant sympy values: exact when both are rational (an integer or
    fraction reference is never matched within a tolerance: a non-rational prediction must then
    agree to `_EXACT_DIGITS` digits), else `|a - b| <= rel_tol * max(|a|, |b|)`."""
    if a == b:
        return True
    if not (a.is_number and b.is_number) or a.has(*_nonfinite()) or b.has(*_nonfinite()):
        return False
    a, b = a.doit(), b.doit()
    if a.is_Rational and b.is_Rational:
        return a == b
    if a.is_Rational:
        rel_tol = min(rel_tol, 10.0 ** (5 - _EXACT_DIGITS))
    x, y = complex(a.evalf(_EXACT_DIGITS)), complex(b.evalf(_EXACT_DIGITS))
    if not all(map(math.isfinite, (x.real, x.imag, y.real, y.imag))):
        return False  # overflowed: too large to compare
    return abs(x - y) <= rel_tol * max(abs(x), abs(y))


def _nonfinite():
    from sympy import nan, oo, zoo

    return (oo, -oo, zoo, nan)


def _same_expression(gold: str, pred: str, rel_tol: float) -> bool:
    g, p = _sympy(gold), _sympy(pred)
    if g is None or p is None or not hasattr(g, "free_symbols") or not hasattr(p, "free_symbols"):
        return False
    gold_symbols = {s.name: s for s in g.free_symbols}
    if not {s.name for s in p.free_symbols} <= set(gold_symbols):
        return False
    if not gold_symbols:
        return _close(g, p, rel_tol)
    from sympy import Rational

    pred_symbols = {s.name: s for s in p.free_symbols}
    for shift, point in enumerate(_POINTS):
        values = {name: Rational(_POINTS[(i + shift) % 3]) for i, name in enumerate(sorted(gold_symbols))}
        at_g = g.subs({gold_symbols[n]: v for n, v in values.items()}).evalf(_EXACT_DIGITS)
        at_p = p.subs({pred_symbols[n]: values[n] for n in pred_symbols}).evalf(_EXACT_DIGITS)
        if not _close(at_g, at_p, rel_tol):
            return False
    return True


def same_value(gold: Value, pred: Value, rel_tol: float = DEFAULT_REL_TOL) -> bool:
    """One reference value against one predicted value (see the module docstring)."""
    if canonical(gold.latex) == canonical(pred.latex) and gold.percent == pred.percent:
        return True
    g, p = rational(gold.latex), rational(pred.latex)
    if g is not None and p is not None:
        if gold.percent == pred.percent:
            return g == p
        return p == g or (p / 100 == g if pred.percent else p == g / 100)
    if gold.percent != pred.percent:
        return False  # a percentage of a non-rational value: rare enough to require the same form
    if "_" in gold.latex or "_" in pred.latex:
        return False  # base-n numbers (`52_8`) are compared as written
    return _same_expression(gold.latex, pred.latex, rel_tol)


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
    """`lhs - rhs` of both, at the fixed points, in a constant non-zero ratio."""
    from sympy import Rational

    sides = [_sympy(v.latex) for v in gold.items + pred.items]
    if any(s is None or not hasattr(s, "free_symbols") for s in sides):
        return False
    g, p = sides[0] - sides[1], sides[2] - sides[3]
    symbols = {s.name: s for s in g.free_symbols} | {s.name: s for s in p.free_symbols}
    names = sorted(symbols)
    ratios = []
    for shift in range(3):
        values = {name: Rational(_POINTS[(i + shift) % 3]) for i, name in enumerate(names)}
        at = [e.subs({s: values[s.name] for s in e.free_symbols}).evalf(_EXACT_DIGITS) for e in (g, p)]
        if not all(x.is_number and x.is_finite for x in at) or at[0] == 0 or at[1] == 0:
            return False
        ratios.append(complex(at[1]) / complex(at[0]))
    return all(abs(r - ratios[0]) <= rel_tol * abs(ratios[0]) for r in ratios)


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
