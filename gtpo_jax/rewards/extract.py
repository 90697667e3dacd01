"""Final-answer extraction and normalisation from untrusted model completions.

Everything here is linear-time string work on bounded input: only the last `tail_chars`
characters of a completion are searched (final answers come last; a 1 MB completion costs no
more than a short one), braces are matched by a counter (no regex backtracking), and an answer
longer than `max_answer_chars` is rejected. Nothing is evaluated.
"""

from __future__ import annotations

import re
import unicodedata

BOX_COMMANDS = ("\\boxed", "\\fbox")
DEFAULT_TAIL_CHARS = 4096
DEFAULT_MAX_ANSWER_CHARS = 512


def _tail(text: str, tail_chars: int) -> str:
    return text[-tail_chars:] if len(text) > tail_chars else text


def _braced(text: str, start: int, max_chars: int) -> str | None:
    """Contents of the `{...}` opening at `text[start]`, or None if unclosed or too long."""
    depth = 0
    for i in range(start, min(len(text), start + max_chars + 2)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def last_boxed(
    text: str, *, tail_chars: int = DEFAULT_TAIL_CHARS, max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS
) -> str | None:
    """Contents of the last complete `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`), else None.

    An unclosed box does not count; an earlier complete one then does.
    """
    text = _tail(text, tail_chars)
    end = len(text)
    while True:
        start = max(text.rfind(cmd, 0, end) for cmd in BOX_COMMANDS)
        if start < 0:
            return None
        cmd = next(c for c in BOX_COMMANDS if text.startswith(c, start))
        i = start + len(cmd)
        if i < len(text) and text[i] == "{":
            found = _braced(text, i, max_answer_chars)
            if found is not None:
                return found
        elif i < len(text) and text[i] == " ":  # "\boxed 5": up to the next space or `$`
            m = re.match(r" ([^\s$]{1,64})", text[i:])
            if m:
                return m.group(1)
        end = start


def _boxes(text: str, max_answer_chars: int) -> list[tuple[int, int, str]]:
    """Every complete box `(start, end, contents)` in `text`, outermost only, in order."""
    found: list[tuple[int, int, str]] = []
    for m in re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text):
        i = m.end()
        if found and m.start() < found[-1][1]:
            continue  # inside the previous box
        if i < len(text) and text[i] == "{":
            inner = _braced(text, i, max_answer_chars)
            if inner is not None:
                found.append((m.start(), i + len(inner) + 2, inner))
        elif b := re.match(r" ([^\s$]{1,64})", text[i:]):
            found.append((m.start(), i + b.end(), b.group(1)))
    return found


_UNBOXED = re.compile(r"^\\(?:boxed|fbox)\s*\{(.*)\}$", re.S)
# Just before the final box: a sign, an operator, or the opening of a command's argument.
_BEFORE = re.compile(
    r"(?:[-+*/^_|<>−]|\\(?:cdot|times|div|pm|mp|neg|lnot|not|sim|approx|ne|neq|le|leq|ge|geq|"
    r"frac|dfrac|tfrac|cfrac|sqrt|binom|log|ln|exp|sin|cos|tan|overline|sqrt\[[^\]]*\]))$"
)
# Just after it: an exponent, subscript, prime, factorial, operator or more digits.
_AFTER = re.compile(r"^(?:[\^_'!+\-*/−0-9]|[.,]\s*[0-9]|\\(?:cdot|times|div|pm|mp|frac|sqrt|not|ne|neq))")
HEDGES = frozenset(
    "or nor maybe perhaps possibly probably either alternatively otherwise unless not wrong incorrect "
    "approximately approx roughly instead".split()
)  # fmt: skip


def boxed_hedge(
    text: str, *, tail_chars: int = DEFAULT_TAIL_CHARS, max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS
) -> str | None:
    """Why the boxed final answer is not the one answer it shows, or None when it is.

    Rejected (strict mode): boxes with different contents (`\\boxed{6} or maybe \\boxed{5}`), and a
    final box that a sign or operator precedes (`-\\boxed{5}`, `\\frac{\\boxed{1}}{2}`), or that an
    exponent, operator, digit or hedge word (`or`, `maybe`, `not`...) follows on its line
    (`\\boxed{5}^{-1}`, `\\boxed{5}\\text{ or }6`).
    """
    text = _tail(text, tail_chars)
    boxes = _boxes(text, max_answer_chars)
    if not boxes:
        return None

    def contents(inner: str) -> str:
        while m := _UNBOXED.match(inner.strip().strip("$").strip()):
            inner = m.group(1)
        return re.sub(r"[\s$]", "", inner)

    if len({contents(inner) for _, _, inner in boxes}) > 1:
        return "several boxed answers that differ"
    start, end, _ = boxes[-1]
    before = text[text.rfind("\n", 0, start) + 1 : start]
    while (stripped := re.sub(r"(?:\s|\$|\\left|\\[(\[]|[(\[{])+$", "", before)) != before:
        before = stripped
    if _BEFORE.search(before):
        return "a sign or operator before the final box"
    line_end = text.find("\n", end)
    after = text[end : len(text) if line_end < 0 else line_end]
    while (stripped := re.sub(r"^(?:\s|\$|\\right|\\[)\]]|[)\]}])+", "", after)) != after:
        after = stripped
    if _AFTER.search(after):
        return "an exponent, operator or digit after the final box"
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", re.sub(r"\\[A-Za-z]+", " ", after))}
    if words & HEDGES:
        return f"a hedge after the final box ({', '.join(sorted(words & HEDGES))})"
    return None


_ANSWER_LINE = re.compile(r"(?i)answer\s*:\s*([^\n]{0,512})")


def answer_line(text: str, *, tail_chars: int = 300) -> str | None:
    """The text after the last `Answer:` in the last `tail_chars` characters (DAPO's rule)."""
    found = _ANSWER_LINE.findall(_tail(text, tail_chars))
    return found[-1].strip() if found else None


def pattern_answer(text: str, pattern: str, *, tail_chars: int = DEFAULT_TAIL_CHARS) -> str | None:
    """Group 1 of the last match of a configured pattern (e.g. GSM8K's `#### (\\S+)`)."""
    found = re.findall(pattern, _tail(text, tail_chars))
    if not found:
        return None
    last = found[-1]
    return (last[0] if isinstance(last, tuple) else last).strip()


def is_plain(answer: str) -> bool:
    """False for answers holding control characters (NUL ...) or non-ASCII digits: look-alike
    digits (fullwidth, mathematical bold, Arabic-Indic ...) are not accepted as numbers."""
    for c in answer:
        cat = unicodedata.category(c)
        if cat == "Cc" and c not in "\t\n":
            return False
        if cat == "Nd" and not ("0" <= c <= "9"):
            return False
    return True


# Minerva / DAPO final-answer normalisation (Lewkowycz et al., 2022; as used by DAPO's verifier).
_SUBSTITUTIONS = [
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
]  # fmt: skip
_REMOVED = [
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
    "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;",
    r",\!", "{,}", '"', "\\dots",
]  # fmt: skip


def normalize_final_answer(answer: str) -> str:
    """Canonical string form of a final answer (Minerva's rules, bounded regexes only)."""
    answer = answer[:DEFAULT_MAX_ANSWER_CHARS].split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for removed in _REMOVED:
        answer = answer.replace(removed, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)  # \frac12 -> \frac{1}{2}
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)  # \sqrt2 -> \sqrt{2}
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()
