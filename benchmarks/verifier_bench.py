"""False positives, false negatives and time per case of two verifiers on our adversarial corpus.

    PYTHONPATH=. python benchmarks/verifier_bench.py [--out benchmarks/results/verifier.jsonl]

Verifiers, each on every case of `tests/data/verifier_cases.jsonl`:
- `gtpo_strict`: our math reward (`math_reward`, strict mode, the default);
- `gtpo_lenient`: our math reward with `strict=False` (the former check);
- `math_verify`: math-verify as peer frameworks use it: `verify(parse(gold), parse(completion))`
  with default configs (gold written `$...$`, as peers pass a LaTeX gold).

Each case runs in a `RewardPool` worker with the pool's default 5 s limit (a verifier can hang
in C code, where its own alarms cannot stop it); time is measured inside the worker, and a
killed case counts as the limit and scores 0. Prints one JSON line per verifier.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from gtpo_jax.rewards.math import gold_answer, math_reward
from gtpo_jax.rewards.pool import RewardPool
from gtpo_jax.rewards.registry import RewardSpec

CORPUS = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "verifier_cases.jsonl"
TIMEOUT_S = 5.0


def gtpo_strict(record: Mapping[str, Any], completion: str) -> tuple[float, dict]:
    start = time.perf_counter()
    score, _ = math_reward(record, completion)
    return score, {"seconds": time.perf_counter() - start}


def gtpo_lenient(record: Mapping[str, Any], completion: str) -> tuple[float, dict]:
    start = time.perf_counter()
    score, _ = math_reward(record, completion, strict=False)
    return score, {"seconds": time.perf_counter() - start}


def math_verify_default(record: Mapping[str, Any], completion: str) -> tuple[float, dict]:
    from math_verify import parse, verify

    start = time.perf_counter()
    score = float(verify(parse(f"${gold_answer(record)}$"), parse(completion)))
    return score, {"seconds": time.perf_counter() - start}


VERIFIERS = {"gtpo_strict": gtpo_strict, "gtpo_lenient": gtpo_lenient, "math_verify": math_verify_default}


def load_cases(path: pathlib.Path = CORPUS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(name: str, cases: list[dict]) -> dict:
    spec = RewardSpec(name, VERIFIERS[name])
    with RewardPool(spec, num_workers=1, timeout_s=TIMEOUT_S) as pool:
        pool.score([{"answer": "1"}], ["\\boxed{1}"])  # imports (sympy, math-verify) outside the timings
        results = pool.score([{"answer": c["gold"]} for c in cases], [c["completion"] for c in cases])
    seconds = np.array([info.get("seconds", TIMEOUT_S) for _, info in results])
    fp = [i for i, (c, (s, _)) in enumerate(zip(cases, results, strict=True)) if s > 0 and not c["expected"]]
    fn = [i for i, (c, (s, _)) in enumerate(zip(cases, results, strict=True)) if s <= 0 and c["expected"]]
    def show(i: int) -> str:
        return f"{cases[i]['kind']}: {cases[i]['completion'][-60:]!r} (gold {cases[i]['gold']!r})"

    return {
        "verifier": name,
        "cases": len(cases),
        "false_positives": len(fp),
        "false_negatives": len(fn),
        "timeouts": sum(1 for _, info in results if info.get("timeout")),
        "p50_ms": round(1000 * float(np.percentile(seconds, 50)), 2),
        "p99_ms": round(1000 * float(np.percentile(seconds, 99)), 2),
        "max_ms": round(1000 * float(seconds.max()), 2),
        "false_positive_cases": [show(i) for i in fp],
        "false_negative_cases": [show(i) for i in fn],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=None, help="also write the JSON lines here")
    parser.add_argument("--verifiers", default=",".join(VERIFIERS), help="comma-separated subset")
    args = parser.parse_args()
    cases = load_cases()
    lines = [json.dumps(run(name, cases)) for name in args.verifiers.split(",")]
    for line in lines:
        print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
