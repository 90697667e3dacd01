"""Built-in synthetic reasoning tasks with exact verifiers: RL signal without any download.

- `arithmetic`: evaluate a random integer expression with `difficulty` operations
  (`+ - *` on small numbers, parenthesised left to right). Answer: an integer.
- `countdown`: reach `target` from `difficulty + 1` numbers, each used at most once, with
  `+ - * /` and parentheses. Any correct expression is accepted; the verifier parses it with a
  small recursive-descent parser over exact fractions (`rewards/countdown.py`; nothing is
  evaluated as Python).
- `chain`: the arithmetic task's chain of `difficulty` operations on single digits (`((7+5)-3)+9`),
  with a reference `solution` that writes every intermediate step and then the final answer
  after `>` (`7+5=12,12-3=9,9+9=18>18`): responses of ~20+ tokens whose path matters. Its reward
  (`rewards/chain.py`) reads only the answer after the last `>`; the warm-up trains on `solution`.

`generate(task, n, seed=..., difficulty=..., split=..., operations="+-*")` is deterministic. A problem's split is a
function of its text alone (a hash), so `train` and `test` are disjoint whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
from fractions import Fraction
from typing import Any

from gtpo_jax.errors import UnknownName, did_you_mean

TEST_FRACTION = 10  # one problem in TEST_FRACTION (by hash) belongs to the test split
INSTRUCTION = "Put the final answer in \\boxed{}."


def _split_of(prompt: str) -> str:
    return "test" if int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % TEST_FRACTION == 0 else "train"


def _arithmetic(rng: random.Random, difficulty: int, operations: str = "+-*") -> dict[str, Any]:
    value = rng.randint(1, 9)
    text = str(value)
    for _ in range(difficulty):
        op, operand = rng.choice(operations), rng.randint(1, 9)
        value = value + operand if op == "+" else value - operand if op == "-" else value * operand
        text = f"({text} {op} {operand})"
    text = text[1:-1] if text.startswith("(") else text
    return {"prompt": f"Compute {text}. {INSTRUCTION}", "answer": str(value), "compact": text.replace(" ", "")}


def _countdown(rng: random.Random, difficulty: int, operations: str = "+-*") -> dict[str, Any]:
    numbers = [rng.randint(1, 12) for _ in range(difficulty + 1)]
    value = Fraction(numbers[0])
    for n in numbers[1:]:  # a solution exists by construction: combine all numbers in order
        op = rng.choice(operations)
        value = value + n if op == "+" else value - n if op == "-" else value * n
    if value <= 0:
        value = Fraction(sum(numbers))
    shown = sorted(numbers)
    prompt = (
        f"Using the numbers {shown}, each at most once, and the operations + - * / with parentheses, "
        f"write an expression equal to {int(value)}. {INSTRUCTION}"
    )
    compact = f"{','.join(map(str, shown))}>{int(value)}"
    return {"prompt": prompt, "answer": str(int(value)), "numbers": shown, "target": int(value), "compact": compact}


def _chain(rng: random.Random, difficulty: int, operations: str = "+-*") -> dict[str, Any]:
    value = rng.randint(1, 9)
    text, steps = str(value), []
    for _ in range(difficulty):
        op, operand = rng.choice(operations), rng.randint(1, 9)
        result = value + operand if op == "+" else value - operand if op == "-" else value * operand
        steps.append(f"{value}{op}{operand}={result}")
        text, value = f"({text}{op}{operand})", result
    text = text[1:-1] if text.startswith("(") else text
    prompt = f"Compute {text} step by step, then write > and the final answer."
    solution = ",".join(steps) + f">{value}"
    return {"prompt": prompt, "answer": str(value), "solution": solution, "compact": text}


TASKS = {"arithmetic": _arithmetic, "countdown": _countdown, "chain": _chain}


def generate(
    task: str,
    n: int,
    *,
    seed: int = 0,
    difficulty: int = 3,
    split: str = "train",
    prompt_style: str = "instruction",
    operations: str = "+-*",
) -> list[dict[str, Any]]:
    """`n` distinct problems of `task` in `split`, as prompt records `{id, prompt, answer, ...}`.

    `prompt_style="compact"` puts the bare problem in `prompt` (`(3+5)*2`, `1,5,7>16`: for small
    character-level models); the split is decided on the instruction text either way.
    """
    if not operations or set(operations) - set("+-*"):
        raise ValueError(f"operations={operations!r}: expected a non-empty subset of '+-*'")
    if prompt_style not in ("instruction", "compact"):
        raise ValueError(f"prompt_style={prompt_style!r}: expected 'instruction' or 'compact'")
    if task not in TASKS:
        raise UnknownName(f"unknown task {task!r}{did_you_mean(task, TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    if difficulty < 1:
        raise ValueError(f"difficulty={difficulty}: must be >= 1")
    rng = random.Random(f"{task}-{seed}-{difficulty}")
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(1000 * n + 1000):
        problem = TASKS[task](rng, difficulty, operations)
        if problem["prompt"] in seen or _split_of(problem["prompt"]) != split:
            continue
        seen.add(problem["prompt"])
        compact = problem.pop("compact")
        if prompt_style == "compact":
            problem = {**problem, "prompt": compact}
        records.append({"id": f"{task}-{split}-{seed}-{len(records)}", **problem})
        if len(records) == n:
            return records
    raise ValueError(f"could not draw {n} distinct {split} problems of {task} at difficulty {difficulty}")
