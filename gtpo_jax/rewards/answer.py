"""A small grammar for final answers: strict mode parses a boxed answer before comparing it.

`parse_answer(text, reference)` reads an answer as exactly one of these forms, or raises
`Rejected` with a reason a person can act on:

- VALUE: one mathematical value: an integer, a decimal, a number with thousands separators
  (`1,234`, `10,\\!080`), a fraction (`\\frac{a}{b}`, `\\dfrac`, `\\tfrac`, `\\frac12`, `a/b`), a
  mixed number (`1\\frac{4}{5}`), a percentage (`15\\%`), or an expression (surds, `\\pi`, trig,
  polynomials in the reference's variables). A unit may follow (`\\text{ cm}^2`, `^\\circ`,
  `18 dollars`) and a `\\$` may lead; units are dropped.
- LIST: values joined by top-level commas, a set `\\{...\\}`, or one value with a single `\\pm`
  (two values). Compared in any order.
- TUPLE: `(a, b, ...)`, or an interval `[a, b)`; compared in order, brackets included. UNION:
  intervals joined by `\\cup`, compared in any order. MATRIX: `\\begin{pmatrix}` / `bmatrix`.
- EQUATION `v = value` or `v \\in S` with exactly one variable on the left; a chain of sides
  without variables that are all equal (`9 + 9 = 18`) stands for its last side. A general
  equation (`5x - 7y + 4 = 0`) only when the reference is one.
- TEXT: words, only when the reference is words (`\\text{Evelyn}`, `(C)`).

Rejected: a command not on the allow-list (hiding, colour and overlap commands such as
`\\phantom`, `\\color`, `\\llap`, `\\smash`; spacing such as `\\quad`; nested boxes; macros;
relations such as `\\le`, `\\approx`, `\\ne`), `\\text` holding words that are not units, words and
logical connectives, characters outside the answer alphabet (`<`, `;`, quotes, a `%` comment),
several values where the reference has one, variables the reference does not have, an
equation that does not hold, and exponent towers or huge factorials no verifier can evaluate in
time (also `\\exp`, `e^`, `\\sinh`, `\\cosh`, `\\Gamma` of an exponential, a factorial, a power or
a number over 9999), a `$` inside the answer (it ends math mode, so what is shown is not what
is read), a `\\text{ }` space between digits (`5\\text{ }6` shows "5 6"), a prime (`5'`) and one
value in square brackets (`[5]`). The reference (trusted) is parsed by the same grammar with
words allowed; a reference that is one letter A-E (`C`, `(C)`) is a multiple-choice TEXT answer.
"""

from __future__ import annotations

import dataclasses
import enum
import re

from gtpo_jax.rewards.extract import _braced

MAX_DEPTH = 12  # brace / bracket nesting
MAX_EXPONENT = 10_000  # literal exponents, factorial arguments

ALLOWED = frozenset(
    "frac sqrt pi infty cdot times div pm mp sin cos tan cot sec csc arcsin arccos arctan log ln exp sinh cosh "
    "tanh alpha beta gamma delta theta phi varphi omega lambda mu sigma rho tau epsilon varepsilon psi chi eta "
    "zeta xi nu kappa Delta Gamma Omega Phi Theta Pi Sigma Lambda circ text cup emptyset varnothing begin end "
    "binom overline lfloor rfloor lceil rceil mathbb in".split()
)  # fmt: skip
ENVIRONMENTS = ("pmatrix", "bmatrix")
UNITS = frozenset(
    "dollar dollars cent cents cm m km mm inch inches in ft foot feet yard yards yd mile miles mph hour hours hr "
    "hrs minute minutes min second seconds sec s day days week weeks month months year years degree degrees "
    "unit units square sq cubic meter meters metre metres gram grams g kg pound pounds lb lbs ounce ounces oz "
    "liter liters litre litres l ml gallon gallons point points way ways percent mi cm2 m2".split()
)  # fmt: skip
CONNECTIVES = frozenset(
    "and or not no nor but if then else either neither maybe probably perhaps possibly approx approximately "
    "about around roughly wait unless except than also is yes false true".split()
)  # fmt: skip
_RENAMED = [(r"\dfrac", r"\frac"), (r"\tfrac", r"\frac"), (r"\dbinom", r"\binom"), (r"\mbox", r"\text"),
            (r"\textrm", r"\text"), (r"\textnormal", r"\text"), (r"\mathrm", r"\text"), (r"\textbf", r"\text"),
            (r"\mathbf", r"\text"), (r"\textit", r"\text"), (r"\mathit", r"\text"),
            (r"\displaystyle", ""), ("−", "-"), ("~", " ")]  # fmt: skip
_SPACING = re.compile(r"(?<!\\)\\([,;: !])")  # `\,` `\!` ... but not the `\\` of a matrix row
_SIZING = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg)(?![A-Za-z])\.?")
_COMMAND = re.compile(r"\\([A-Za-z]+|.)")
_ALPHABET = re.compile(r"[0-9A-Za-z\s+\-*/^_()\[\]{}.,=|!'\\&$%]*")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_VARIABLE = re.compile(r"[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?|\\(?:theta|alpha|beta|phi|lambda|mu)")


class Rejected(ValueError):
    """The answer is outside the grammar; `str(e)` says why."""


class Kind(enum.StrEnum):
    VALUE = "value"
    LIST = "list"
    TUPLE = "tuple"
    UNION = "union"
    MATRIX = "matrix"
    EQUATION = "equation"
    TEXT = "text"


@dataclasses.dataclass(frozen=True)
class Value:
    """One value in LaTeX (units dropped); `percent` when it ended in `\\%`, `degrees` when a
    degree sign was dropped."""

    latex: str
    percent: bool = False
    degrees: bool = False


@dataclasses.dataclass(frozen=True)
class Answer:
    """A parsed answer. `items`: the values (TUPLE/LIST/MATRIX), intervals (UNION), the two sides
    (EQUATION) or one value; `shape`: brackets of a TUPLE (`"[)"`) or `"RxC"` of a MATRIX;
    `variable`: the left side of `v = value`; `text`: a TEXT answer, normalised."""

    kind: Kind
    items: tuple = ()
    shape: str = ""
    variable: str = ""
    text: str = ""

    @property
    def letters(self) -> frozenset[str]:
        """Variables the answer uses (letters outside commands), for checking a prediction's."""
        found = set(self.variable)
        for item in self.items:
            found |= item.letters if isinstance(item, Answer) else letters_of(item.latex)
        return frozenset(found)


def _plain(latex: str) -> str:
    """`latex` without commands and environment names."""
    return _COMMAND.sub(" ", re.sub(r"\\(?:begin|end)\{\w*\}", " ", latex))


def letters_of(latex: str) -> set[str]:
    """Letters outside commands and environment names: the variables of `latex`."""
    return set(re.findall(r"[A-Za-z]", _plain(latex)))


def normalize(text: str) -> str:
    """Spacing and sizing commands dropped, synonyms renamed, `$` and outer braces stripped."""
    text = text.strip().strip("$").strip()
    text = _SIZING.sub("", text)
    text = re.sub(r",\\!\s*(?=\d{3}(?!\d))", ",", text)  # `11,\! 111`: LaTeX's thousands comma
    for before, after in _RENAMED:
        text = text.replace(before, after)
    text = _SPACING.sub(lambda m: "" if m.group(1) == "!" else " ", text)
    while text.startswith("{") and _braced(text, 0, len(text)) == text[1:-1]:
        text = text[1:-1].strip()
    return re.sub(r"\s+", " ", text).strip()


def _screen(text: str) -> None:
    """Rejects commands off the allow-list, odd characters, deep nesting and unbounded numbers."""
    for m in _COMMAND.finditer(text):
        name = m.group(1)
        if name.isalpha() and name not in ALLOWED:
            raise Rejected(f"command \\{name} is not allowed in an answer")
        if not name.isalpha() and name not in "{}%$\\":
            raise Rejected(f"escaped character \\{name} is not allowed in an answer")
    if "**" in text:
        raise Rejected("** is not LaTeX (write powers as ^)")
    if not _ALPHABET.fullmatch(text):
        bad = sorted(set(re.sub(_ALPHABET.pattern.replace("]*", "]"), "", text)))
        raise Rejected(f"characters {''.join(bad)!r} are not allowed in an answer")
    depth = 0
    for c in text:
        depth += c in "{([" and 1 or (-1 if c in "})]" else 0)
        if depth > MAX_DEPTH:
            raise Rejected(f"nested deeper than {MAX_DEPTH} levels")
    for env in re.findall(r"\\(?:begin|end)\{([^{}]*)\}", text):
        if env not in ENVIRONMENTS:
            raise Rejected(f"environment {env!r} is not allowed (only {', '.join(ENVIRONMENTS)})")
    if re.search(r"\\(?:begin|end)(?!\{)", text):
        raise Rejected("\\begin / \\end without an environment name")
    big_exponents = 0
    for m in re.finditer(r"\^\s*(\{|[0-9]+)", text):
        exponent = _braced(text, m.start(1), len(text)) if m.group(1) == "{" else m.group(1)
        if exponent is None:
            raise Rejected("an unclosed exponent")
        if "^" in exponent and not letters_of(exponent):
            raise Rejected("an exponent tower (too large to evaluate)")
        numbers = [int(n) for n in re.findall(r"\d+", exponent)]
        if any(n > MAX_EXPONENT for n in numbers):
            raise Rejected(f"an exponent over {MAX_EXPONENT}")
        big_exponents += any(n > 100 for n in numbers)
    if big_exponents > 1:
        raise Rejected("more than one exponent over 100 (too large to evaluate)")
    for m in re.finditer(r"\\binom", text):
        if re.search(r"\^|\d{7}", text[m.end() : m.end() + 80]):
            raise Rejected("a binomial of a huge number")
    for m in re.finditer(r"([0-9]*)\s*\)?\s*!", text):
        if not m.group(1) or int(m.group(1)) > 1000:
            raise Rejected("a factorial of something other than a number <= 1000")
    for m in _GROWTH.finditer(text):
        argument = _argument(text, m.end())
        if _GROWTH.search(argument) or re.search(r"!", argument):
            raise Rejected(f"{m.group(0).strip()} of an exponential or factorial (a tower: too large to evaluate)")
        if not letters_of(argument) and ("^" in argument or any(len(n) > 4 for n in re.findall(r"\d+", argument))):
            raise Rejected(f"{m.group(0).strip()} of a number over 9999 or of a power (too large to evaluate)")


_GROWTH = re.compile(r"\\(?:exp|sinh|cosh|Gamma)(?![A-Za-z])|(?<![A-Za-z\\])e\s*\^")
_CLOSING = {"(": ")", "{": "}", "[": "]"}


def _argument(text: str, i: int) -> str:
    """The argument of a function whose name ends at `text[i]`: a bracketed group, else one token."""
    m = re.match(r"\s*(?:\\left)?\s*", text[i:])
    i += m.end()
    if i < len(text) and text[i] in _CLOSING:
        opening, closing, depth = text[i], _CLOSING[text[i]], 0
        for j in range(i, len(text)):
            depth += (text[j] == opening) - (text[j] == closing)
            if depth == 0:
                return text[i + 1 : j]
        return text[i:]
    m = re.match(r"\\[A-Za-z]+|[0-9.]+|[A-Za-z]", text[i:])
    return m.group(0) if m else ""


def _unwrap_text(text: str) -> str:
    """`\\text{...}` groups: numbers kept, units at the end dropped; words raise."""
    out, i = [], 0
    while (j := text.find("\\text", i)) >= 0:
        out.append(text[i:j])
        k = j + len("\\text")
        while k < len(text) and text[k] == " ":
            k += 1
        inner = _braced(text, k, len(text)) if k < len(text) and text[k] == "{" else None
        if inner is None:
            raise Rejected("\\text without a braced argument")
        content = inner.strip()
        words = re.findall(r"[A-Za-z]+", content)
        if not words:
            if not re.fullmatch(r"[0-9.,\s()\-]*", content):
                raise Rejected(f"\\text{{{content[:40]}}} holds symbols, not an answer")
            out.append(f" {content} " if inner != content else content)  # `5\text{ }6` shows "5 6"
        elif all(w in UNITS for w in words) and re.fullmatch(r"[A-Za-z\s.]*", content):
            if m := re.match(r"\s*\^\s*(?:\{\s*[23]\s*\}|[23])", text[k + len(inner) + 2 :]):
                k += len(m.group(0))  # `\text{ cm}^2`
            if text[k + len(inner) + 2 :].strip():
                raise Rejected(f"a unit (\\text{{{content[:40]}}}) in the middle of the answer")
        else:
            raise Rejected(f"words in the answer: \\text{{{content[:40]}}} (only units may follow a value)")
        i = k + len(inner) + 2
    out.append(text[i:])
    return "".join(out)


def _split_top(text: str, separator: str) -> list[str]:
    """`text` split at `separator` outside braces, brackets and parentheses (`\\{ \\}` count too)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        if text.startswith(separator, i) and depth == 0:
            parts.append(text[start:i])
            i += len(separator)
            start = i
            continue
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            depth += 1 if text[i + 1] == "{" else -1
            i += 2
            continue
        depth += 1 if c in "{([" else (-1 if c in "})]" else 0)
        i += 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _strip_units(text: str, reference_letters: frozenset[str]) -> str:
    """Drops degrees, a leading/trailing `\\$` and trailing bare unit words (`18 dollars`)."""
    text = _DEGREES.sub("", text)
    text = re.sub(r"^\\\$\s*|\s*\\\$$", "", text).strip()
    m = re.search(r"(?<=[\d}])\s*([A-Za-z]+(?:\s+[A-Za-z]+)?)(?:\^[23])?$", text)
    if m and all(w in UNITS for w in m.group(1).split()) and not set(m.group(1)) <= reference_letters:
        return text[: m.start()].strip()
    return text.strip()


def _value(text: str, reference: Answer | None) -> Value:
    text = text.strip()
    percent = text.endswith("\\%") or text.endswith("%")
    text = text.removesuffix("\\%").removesuffix("%").strip()
    if "%" in text:
        raise Rejected("a % inside the answer (in LaTeX, % starts a comment that hides the rest)")
    if not text:
        raise Rejected("an empty value")
    if text.startswith("[") and text.endswith("]") and _group_end(text) == len(text) - 1:
        raise Rejected("one value in square brackets (a list, a floor or a citation?)")
    if re.search(r"(?<![\d_])\d+\s+\d", text) and not _is_thousands(text, reference):  # not `\log_2 8`
        raise Rejected("two numbers side by side (several candidate values?)")
    if _is_thousands(text, reference):
        text = text.replace(",", "").replace(" ", "")
    return Value(text, percent)


def _group_end(text: str) -> int:
    """Index where the bracket opening `text` closes (-1 if never)."""
    depth = 0
    for j, c in enumerate(text):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0:
            return j
    return -1


def _is_thousands(text: str, reference: Answer | None) -> bool:
    """`1,234,567` (a space after the commas only in a trusted reference), where one value is due."""
    if reference is None:
        return bool(_THOUSANDS.fullmatch(text.replace(", ", ",")))
    return reference.kind == Kind.VALUE and bool(_THOUSANDS.fullmatch(text))


def _interval_or_tuple(text: str, reference: Answer | None) -> Answer | None:
    if len(text) >= 2 and text[0] in "([" and text[-1] in ")]":
        inner = _split_top(text[1:-1], ",")
        if len(inner) >= 2 and _split_top(text, ",") == [text]:
            return Answer(Kind.TUPLE, tuple(_value(v, None) for v in inner), shape=text[0] + text[-1])
    return None


def _structure(text: str, reference: Answer | None) -> Answer:
    """The form of an answer with no relation at the top level."""
    if text.startswith("\\begin{"):
        m = re.fullmatch(r"\\begin\{(\w+)\}(.*)\\end\{(\w+)\}", text, flags=re.S)
        if not m or m.group(1) != m.group(3):
            raise Rejected("a matrix must be one \\begin{pmatrix} ... \\end{pmatrix}")
        rows = [_split_top(r, "&") for r in _split_top(m.group(2), "\\\\") if r.strip()]
        if not rows or len({len(r) for r in rows}) != 1:
            raise Rejected("matrix rows of different lengths")
        cells = tuple(_value(c, None) for r in rows for c in r)
        return Answer(Kind.MATRIX, cells, shape=f"{len(rows)}x{len(rows[0])}")
    if "\\\\" in text or "&" in text:
        raise Rejected("line breaks or alignment outside a matrix")
    unions = _split_top(text, "\\cup")
    if len(unions) > 1:
        parts = [_interval_or_tuple(u, reference) for u in unions]
        if any(p is None for p in parts):
            raise Rejected("\\cup joins something that is not an interval")
        return Answer(Kind.UNION, tuple(parts))
    if text.startswith("\\{") and text.endswith("\\}"):
        return Answer(Kind.LIST, tuple(v for item in _split_top(text[2:-2], ",") for v in _expand_pm(item)))
    if (found := _interval_or_tuple(text, reference)) is not None:
        return found
    items = [text.replace(" ", "")] if _is_thousands(text, reference) else None
    items = items or _split_top(text, ",")
    values = [v for item in items for v in _expand_pm(item, reference)]
    if len(values) > 1:
        return Answer(Kind.LIST, tuple(values))
    return Answer(Kind.VALUE, tuple(values))


def _expand_pm(text: str, reference: Answer | None = None) -> list[Value]:
    text = text.replace("\\mp", "\\pm")
    if text.count("\\pm") > 1:
        raise Rejected("more than one \\pm in a value")
    if "\\pm" in text:
        return [_value(text.replace("\\pm", "+"), reference), _value(text.replace("\\pm", "-"), reference)]
    return [_value(text, reference)]


def _text_answer(text: str) -> str:
    """Words normalised for comparison: `\\text{(C)}` -> `c`, `\\text{ Evelyn }` -> `evelyn`."""
    text = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", normalize(text))
    return " ".join(re.sub(r"[^a-z0-9\s]", " ", text.lower()).split())


def _with_degrees(answer: Answer, degrees: bool) -> Answer:
    """A single value that carried a degree sign remembers it (`180^\\circ` may equal `\\pi`)."""
    if degrees and answer.kind == Kind.VALUE and len(answer.items) == 1:
        return dataclasses.replace(answer, items=(dataclasses.replace(answer.items[0], degrees=True),))
    return answer


def parse_answer(text: str, reference: Answer | None = None) -> Answer:
    """Parses `text`; `reference=None` parses a (trusted) reference answer, where words are TEXT.

    A prediction is parsed against its reference: its variables must be the reference's, and
    it is read as TEXT only when the reference is TEXT.
    """
    raw = normalize(text)
    if not raw:
        raise Rejected("an empty answer")
    if len(raw) > 512:
        raise Rejected("an answer over 512 characters")
    _screen(raw)
    if re.search(r"(?<!\\)\$", raw):
        raise Rejected("a $ inside the answer (it ends math mode: what is shown differs from what is read)")
    if reference is None and re.fullmatch(r"\(?[A-E]\)?|\\text\{\s*\(?[A-E]\)?\s*\}", raw):
        return Answer(Kind.TEXT, text=_text_answer(raw))  # a multiple-choice letter
    if reference is not None and reference.kind == Kind.TEXT:
        return Answer(Kind.TEXT, text=_text_answer(raw))
    ref_letters = reference.letters if reference is not None else frozenset()
    try:
        body = _unwrap_text(raw)
    except Rejected:
        if reference is None and re.fullmatch(r"[\\\w\s{}().,'-]*", raw):
            return Answer(Kind.TEXT, text=_text_answer(raw))
        raise
    degrees = bool(_DEGREES.search(body))
    body = _strip_units(body, ref_letters)
    body = normalize(body)
    sides = _split_top(body, "=")
    if len(sides) == 1 and len(in_sides := _split_top(body, "\\in")) == 2:
        sides = in_sides
    elif "\\in" in body.replace("\\infty", "").replace("\\int", ""):
        raise Rejected("\\in must be `variable \\in set`")
    if any(not s for s in sides):
        raise Rejected("an equation with an empty side")
    if reference is not None and "'" in body:
        raise Rejected("a prime ' (feet, minutes or a derivative), not a value")
    if reference is not None:
        words = [w for w in re.findall(r"[A-Za-z]+", _plain(body)) if len(w) > 1]
        for w in words:
            if w.lower() in CONNECTIVES or w.lower() in UNITS and not set(w) <= ref_letters:
                raise Rejected(f"the word {w!r} in the answer")
        left_var = sides[0] if len(sides) > 1 and _VARIABLE.fullmatch(sides[0]) else ""
        extra = letters_of(body) - ref_letters - letters_of(left_var)
        if extra:
            raise Rejected(f"variables {''.join(sorted(extra))} that the reference answer does not have")
    if len(sides) == 1:
        return _with_degrees(_structure(sides[0], reference), degrees)
    variable = sides[0] if _VARIABLE.fullmatch(sides[0]) else ""
    rest = sides[1:] if variable else sides
    if variable and len(rest) == 1:
        return dataclasses.replace(_with_degrees(_structure(rest[0], reference), degrees), variable=variable)
    if not any(letters_of(s) for s in rest):  # `9 + 9 = 18`: checked to hold, then its last side counts
        return Answer(Kind.EQUATION, tuple(_value(s, None) for s in rest), shape="chain", variable=variable)
    if len(sides) == 2 and (reference is None or reference.kind == Kind.EQUATION):
        return Answer(Kind.EQUATION, tuple(_value(s, None) for s in sides))
    raise Rejected("an equation that is not `variable = value` (one variable on the left, one value)")
