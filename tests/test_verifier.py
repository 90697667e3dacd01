"""The strict math verifier: our adversarial corpus, time limits, and every dataset's own answers."""

import importlib.util
import json
import pathlib
import time

import pytest

from gtpo_jax.data import tasks
from gtpo_jax.rewards.answer import Kind, Rejected, parse_answer
from gtpo_jax.rewards.equivalence import equivalent_answers
from gtpo_jax.rewards.math import exact_reward, math_reward
from gtpo_jax.rewards.pool import RewardPool
from gtpo_jax.rewards.registry import RewardSpec

pytest.importorskip("math_verify")
ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = [json.loads(line) for line in (ROOT / "tests" / "data" / "verifier_cases.jsonl").read_text().splitlines()]
DATA = ROOT.parent / "shared" / "data"
POOL_TIMEOUT_S = 5.0  # RewardPool's default limit; every case must finish well inside it


def timed_math(record, completion):
    """The math reward, timed inside the worker (module level: spawned workers import it)."""
    start = time.perf_counter()
    score, info = math_reward(record, completion)
    return score, {**info, "seconds": time.perf_counter() - start}


def test_corpus_is_large_and_complete():
    assert len(CASES) >= 150
    kinds = {c["kind"] for c in CASES}
    assert kinds == {"equivalent", "near_miss", "hack", "pathological"}
    for case in CASES:
        assert set(case) == {"kind", "gold", "completion", "expected", "why"} and case["why"], case
        assert case["expected"] in (0, 1)
    assert sum(c["expected"] for c in CASES) >= 90 and sum(1 - c["expected"] for c in CASES) >= 150


@pytest.fixture(scope="module")
def corpus_results():
    with RewardPool(RewardSpec("timed_math", timed_math), num_workers=2, timeout_s=POOL_TIMEOUT_S) as pool:
        pool.score([{"answer": "1"}], ["\\boxed{1}"])  # imports outside the timings
        return pool.score([{"answer": c["gold"]} for c in CASES], [c["completion"] for c in CASES])


def test_no_false_positives_and_every_false_negative_is_argued(corpus_results):
    scores = [score for score, _ in corpus_results]
    false_positives = [c for c, s in zip(CASES, scores, strict=True) if s > 0 and not c["expected"]]
    assert not false_positives, false_positives
    false_negatives = [c["completion"][-60:] for c, s in zip(CASES, scores, strict=True) if s <= 0 and c["expected"]]
    argued = [c["completion"][-60:] for c in CASES if c["why"].startswith("False negative")]
    assert false_negatives == argued, "false negatives must be exactly the cases whose `why` argues one"
    assert len(argued) <= 5


def test_no_case_comes_near_the_pool_time_limit(corpus_results):
    assert not [info for _, info in corpus_results if info.get("timeout") or info.get("crashed")]
    slowest = max(info["seconds"] for _, info in corpus_results)
    assert slowest < POOL_TIMEOUT_S / 4, slowest


def test_rejections_say_why():
    gold = parse_answer("18")
    for pred, reason in [
        ("\\phantom{7}18", "\\phantom"),
        ("\\color{white}{7}18", "\\color"),
        ("18 \\text{ or } 17", "words"),
        ("18 or 17", "'or'"),
        ("18x", "variables x"),
        ("9^{9^{9^9}}", "tower"),
        ("18 % 17", "comment"),
        ("18 \\approx 17", "\\approx"),
        ("17 18", "side by side"),
        ("17\\text{ cm}+1", "middle"),
    ]:
        with pytest.raises(Rejected, match=reason.replace("\\", "\\\\")):
            parse_answer(pred, gold)
    with pytest.raises(Rejected, match="variable = value"):
        parse_answer("x + 1 = 19", parse_answer("x = 18"))
    assert parse_answer("5, 7", gold).kind == Kind.LIST  # parsed; a list never equals one value
    assert math_reward({"answer": "18"}, "\\boxed{17 = 18}")[0] == 0.0


def test_options_strict_and_rel_tol_change_verdicts():
    # 1.41421356 is sqrt(2) to 1.7e-9 relative: outside the default 1e-9, inside 1e-8.
    assert math_reward({"answer": "\\sqrt{2}"}, "\\boxed{1.41421356}")[0] == 0.0
    assert math_reward({"answer": "\\sqrt{2}"}, "\\boxed{1.41421356}", rel_tol=1e-8)[0] == 1.0
    # The former lenient check reads only the last side of an equation; strict mode checks it holds.
    assert math_reward({"answer": "18"}, "\\boxed{17 = 18}", strict=False)[0] == 1.0
    assert math_reward({"answer": "18"}, "\\boxed{17 = 18}")[0] == 0.0


def _records(path: pathlib.Path, every: int = 1) -> list[dict]:
    if not path.exists():
        pytest.skip(f"{path} is absent (shared data sits beside the repository; see shared/data/README.md)")
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines[::every]]


@pytest.mark.parametrize(
    "name, every",
    [
        ("gsm8k/test.jsonl", 4),
        ("math500/test.jsonl", 1),
        ("aime24/test.jsonl", 1),
        ("aime25/test.jsonl", 1),
        ("dapo_math_17k/train.jsonl", 60),
    ],
)
def test_each_dataset_gold_answer_boxed_scores_one(name, every):
    records = _records(DATA / name, every)
    start = time.monotonic()
    wrong = []
    for record in records:
        gold = record["answer"].rsplit("####", 1)[-1].strip()
        if math_reward(record, f"So the answer is $\\boxed{{{gold}}}$.")[0] != 1.0:
            wrong.append(gold)
        if "####" in record["answer"] and math_reward(record, f"...\n#### {gold}")[0] != 1.0:
            wrong.append(f"#### {gold}")
        reference = parse_answer(gold)  # the grammar reads every reference, not only its exact text
        assert equivalent_answers(reference, parse_answer(gold, reference)), gold
    assert not wrong, wrong[:20]
    assert len(records) >= 30 and time.monotonic() - start < 30


def test_default_task_gold_answers_score_one_with_its_exact_reward():
    spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert c.reward.name == "exact"
    for split in ("train", "test"):
        records = tasks.generate(
            c.data.task,
            200,
            difficulty=c.data.difficulty,
            split=split,
            prompt_style=c.data.prompt_style,
            operations=c.data.operations,
        )
        for r in records:
            assert exact_reward(r, r["answer"], answer_pattern=c.reward.answer_pattern)[0] == 1.0, r
            assert exact_reward(r, f"\\boxed{{{r['answer']}}}", answer_pattern=c.reward.answer_pattern)[0] == 1.0
            assert math_reward(r, f"\\boxed{{{r['answer']}}}")[0] == 1.0
