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
# Just before the final box, in its math segment: a sign, an operator, a digit, or the opening of
# a command's argument.
_BEFORE = re.compile(
    r"(?:[-+*/^_|<>−0-9.]|\\(?:cdot|times|div|pm|mp|neg|lnot|not|sim|approx|ne|neq|le|leq|ge|geq|"
    r"frac|dfrac|tfrac|cfrac|sqrt|binom|log|ln|exp|sin|cos|tan|overline|sqrt\[[^\]]*\]))$"
)
# Just after it: an exponent, subscript, prime, factorial, operator or more digits.
_AFTER = re.compile(r"^(?:[\^_'!+\-*/−0-9]|[.,]\s*[0-9]|\\(?:cdot|times|div|pm|mp|frac|sqrt|not|ne|neq))")
# A degree mark just after the box (`\boxed{30}^\circ`): the answer is in degrees.
_DEGREES_AFTER = re.compile(r"^(?:\^\s*(?:\\circ|\{\s*\\circ\s*\})|°|\\degree(?![A-Za-z]))")
_MATH_OPENER = re.compile(r"(?:\$\$?|\\\(|\\\[)$")
_EMPHASIS_PAIR = re.compile(r"(?<![^\s(:])(\*{1,3})(?=[^\s*])([^*\n]*?[^\s*])\1(?!\*)")  # **bold**
_EMPHASIS_OPEN = re.compile(r"(?:^|(?<=\s))(\*{1,3})(?=[^\s*]|$)")  # `**` opening emphasis
_BULLET = re.compile(r"^\s*[*+]\s+")  # `* ` / `+ ` list bullets (not `- `: it reads as a minus)
HEDGES = frozenset(
    "or nor maybe perhaps possibly probably either alternatively otherwise unless not wrong incorrect "
    "approximately approx roughly instead".split()
)  # fmt: skip
TRAILING_CHARS = 200  # after the final box, hedges are looked for this far, at most 2 more lines


def _in_math(prefix: str) -> bool:
    """Whether a math segment opened in `prefix` (one line) is still open at its end."""
    dollars = len(re.findall(r"(?<!\\)\$", prefix))
    return dollars % 2 == 1 or prefix.rfind("\\(") > prefix.rfind("\\)") or prefix.rfind("\\[") > prefix.rfind("\\]")


def _strip_after(after: str) -> str:
    while (stripped := re.sub(r"^(?:\s|\$|\\right|\\[)\]]|[)\]}])+", "", after)) != after:
        after = stripped
    return after


def _final_box(text: str, max_answer_chars: int) -> tuple[str | None, str, bool]:
    """(why the final box is not the one answer shown or None, all text after it, degrees).

    Markdown outside math around the box is dropped (`**Answer:** $\\boxed{5}$`, `**\\boxed{5}**`,
    `* \\boxed{5}`, `| x | \\boxed{5} |`); a sign or operator in the box's own math segment, or
    just before the `$` that opens it, is not (`$-\\boxed{5}$`, `-$\\boxed{5}$`).
    """
    boxes = _boxes(text, max_answer_chars)
    start, end, _ = boxes[-1]
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    line = text[line_start : len(text) if line_end < 0 else line_end]
    before = _BULLET.sub("", text[line_start:start])
    # Emphasis opened before the box on its line and closed just after it: `**Answer: \boxed{5}**`.
    opened = [m for m in _EMPHASIS_OPEN.finditer(_EMPHASIS_PAIR.sub(r"\2", before))]
    rest = text[end:]
    after = _strip_after(rest if line_end < 0 else text[end:line_end])  # the rest of the box's line
    degrees = bool(m := _DEGREES_AFTER.match(after))
    if m:
        after = _strip_after(after[m.end() :])
    closed = bool(opened) and re.match(re.escape(opened[-1].group(1)) + r"(?!\*)", after) is not None
    if closed:
        after = _strip_after(after[len(opened[-1].group(1)) :])
    while (stripped := re.sub(r"(?:\s|\\left|\\[(\[]|[(\[{])+$", "", before)) != before:
        before = stripped
    if (opener := _MATH_OPENER.search(before)) is None and _in_math(before):
        prefix = before  # the box is inside a math segment: no markdown there
    else:  # the box opens its math segment, or is in text: markdown may precede it
        prefix = _EMPHASIS_PAIR.sub(r"\2", before if opener is None else before[: opener.start()])
        if closed and (m := re.search(r"(?:^|(?<=\s))\*{1,3}$", prefix)) and m.group() == opened[-1].group(1):
            prefix = prefix[: m.start()]  # `**\boxed{5}**`, `**$\boxed{5}$**`
        prefix = prefix.rstrip()
        table = line.strip().startswith("|") and line.strip().endswith("|") and line.count("|") >= 3
        if table and prefix.endswith("|"):  # a table cell's left border
            prefix = prefix[:-1].rstrip()
    if _BEFORE.search(prefix.rstrip()):
        return "a sign, operator or digit before the final box", rest, degrees
    if _AFTER.search(after):
        return "an exponent, operator or digit after the final box", rest, degrees
    return None, rest, degrees


def boxed_hedge(
    text: str, *, tail_chars: int = DEFAULT_TAIL_CHARS, max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS
) -> str | None:
    """Why the boxed final answer is not the one answer it shows, or None when it is.

    Rejected (strict mode): boxes with different contents (`\\boxed{6} or maybe \\boxed{5}`), and a
    final box that a sign, operator or digit precedes (`-\\boxed{5}`, `\\frac{\\boxed{1}}{2}`), that
    an exponent, operator or digit follows (`\\boxed{5}^{-1}`; a degree mark `\\boxed{30}^\\circ`
    is not one), or that a hedge word (`or`, `maybe`, `not`...) follows within 200 characters and
    the next 2 lines (`\\boxed{5}\\text{ or }6`, `\\boxed{5}` then `or 6` on the next line), or a
    further line holding only a number or formula (another candidate). Markdown around the box
    (`**Answer:** $\\boxed{5}$`, `**\\boxed{5}**`, `* \\boxed{5}`, a table cell) is allowed.
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
    why, after, _ = _final_box(text, max_answer_chars)
    if why:
        return why
    first, *later = after[:TRAILING_CHARS].split("\n")
    window = "\n".join([first] + [x for x in later if x.strip()][:2])  # the box's line, 2 more lines
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", re.sub(r"\\[A-Za-z]+", " ", window))}
    if words & HEDGES:
        return f"a hedge after the final box ({', '.join(sorted(words & HEDGES))})"
    for later in window.split("\n")[1:]:
        bare = re.sub(r"\s|\$|\\[()\[\]]|\*|\\quad|\\qquad", "", later)
        if re.search(r"[0-9]", bare) and not re.search(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", "", bare)):
            return "another candidate on a line after the final box"
    return None


def boxed_in_degrees(
    text: str, *, tail_chars: int = DEFAULT_TAIL_CHARS, max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS
) -> bool:
    """Whether a degree mark follows the final box (`\\boxed{30}^\\circ`, `\\boxed{30}°`)."""
    text = _tail(text, tail_chars)
    return bool(_boxes(text, max_answer_chars)) and _final_box(text, max_answer_chars)[2]


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
