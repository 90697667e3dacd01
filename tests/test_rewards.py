"""Rewards: an adversarial corpus, random strings, hard time limits, killed workers."""

import os
import signal
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reward_helpers import slow_echo

from gtpo_jax.rewards.extract import answer_line, last_boxed, normalize_final_answer
from gtpo_jax.rewards.pool import RewardPool
from gtpo_jax.rewards.registry import REWARDS, RewardSpec, call_reward, get_reward

pytest.importorskip("math_verify")
TIMEOUT_S = 2.0
HUGE = ["9^{9^{9^9}}", "10^{10^{10^{10}}}", "10**10**10**10", "2^{2^{2^{2^{2^{2}}}}}"]

# (gold answer, completion, expected math reward). Right ones must score 1, wrong ones 0.
MATH_CORPUS = [
    # Equivalent forms that must be accepted.
    ("0.5", "so the answer is \\boxed{\\frac12}", 1),
    ("0.5", "\\boxed{\\frac{1}{2}}", 1),
    ("\\frac{1}{2}", "\\boxed{0.5}", 1),
    ("1/2", "\\boxed{0.5}", 1),
    ("\\sqrt{8}", "\\boxed{2\\sqrt{2}}", 1),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", 1),
    ("\\sqrt{8}", "\\boxed{2√2}", 1),
    ("#### 18", "\\boxed{18.0}", 1),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 18", "\\boxed{18}", 1),
    ("18", "\\boxed{18}", 1),
    ("18", "\\boxed{ 18 }", 1),
    ("18", "$\\boxed{18}$.", 1),
    ("18", "\\fbox{18}", 1),
    ("18", "\\boxed 18", 1),
    ("1000", "\\boxed{1,000}", 1),
    ("\\pi", "\\boxed{\\pi}", 1),
    ("-3", "\\boxed{-3}", 1),
    ("-3", "\\boxed{−3}", 1),
    ("\\frac{3}{4}", "\\boxed{\\dfrac{3}{4}}", 1),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", 1),
    ("2", "\\boxed{\\sqrt{4}}", 1),
    ("10", "\\boxed{\\text{10}}", 1),
    # Several boxed answers that differ: rejected (a correction and a hedge look alike to a verifier).
    ("7", "first \\boxed{3}, then corrected: \\boxed{7}", 0),
    ("7", "first \\boxed{7}, checked again: \\boxed{7}", 1),
    ("3", "first \\boxed{3}, then corrected: \\boxed{7}", 0),
    ("5", "\\boxed{5} ... wait \\boxed{", 1),  # unclosed last box: the last complete one counts
    # Unclosed or malformed boxes.
    ("5", "the answer is \\boxed{5", 0),
    ("5", "\\boxed{", 0),
    ("5", "\\boxed", 0),
    ("5", "\\boxed{}", 0),
    ("5", "}}}}\\boxed}5{", 0),
    # Deeply nested braces.
    ("5", "\\boxed{" + "{" * 5000 + "5" + "}" * 5000 + "}", 0),  # too long to be an answer
    ("5", "\\boxed{{{{{5}}}}}", 1),
    ("5", "\\boxed{" + "{" * 100000, 0),
    # Huge powers must not hang the scorer.
    *[("3", f"\\boxed{{{h}}}", 0) for h in HUGE],
    ("3", "\\boxed{10^{-10^{10^{10}}}}", 0),
    ("3", "\\boxed{(10^{10^{10}})!}", 0),
    # Long completions: only the end is read.
    ("3", "x" * 1_000_000 + "\\boxed{3}", 1),
    ("3", "\\boxed{3}" + "x" * 1_000_000, 0),
    ("3", "word " * 200_000, 0),
    # NUL and look-alike digits.
    ("18", "\\boxed{1\x008}", 0),
    ("18", "\\boxed{18\x00}", 0),
    ("18", "\\boxed{１８}", 0),  # fullwidth
    ("18", "\\boxed{𝟏𝟖}", 0),  # mathematical bold
    ("18", "\\boxed{١٨}", 0),  # Arabic-Indic
    ("18", "\\boxed{l8}", 0),
    ("0", "\\boxed{O}", 0),
    # The answer only in the prompt (never in the completion) or not boxed.
    ("42", "I am not sure.", 0),
    ("42", "", 0),
    ("42", "The question says 42 but I think it is 41.", 0),
    ("42", "42", 0),
    # Code and injection strings are never run.
    ("0", "\\boxed{__import__('os').system('touch /tmp/pwned_gtpo')}", 0),
    ("1", "\\boxed{eval('1-1')}", 0),  # read as the LaTeX product e*v*a*l*(1-1) = 0, never run
    ("0", '\\boxed{exec("import os")}', 0),
    ("2", "\\boxed{(lambda: 2)()}", 0),
    ("0", "\\boxed{().__class__.__base__.__subclasses__()}", 0),
    ("1", "\\boxed{\\input{/etc/passwd}}", 0),
    # Plainly wrong answers.
    ("18", "\\boxed{17}", 0),
    ("18", "\\boxed{18.5}", 0),
    ("0.5", "\\boxed{\\frac{1}{3}}", 0),
    ("\\sqrt{8}", "\\boxed{\\sqrt{7}}", 0),
    ("18", "\\boxed{-18}", 0),
    ("x^2", "\\boxed{x^3}", 0),
]


def test_corpus_is_large_enough():
    assert len(MATH_CORPUS) >= 60


@pytest.fixture(scope="module")
def math_pool():
    with RewardPool("math", num_workers=2, timeout_s=TIMEOUT_S) as pool:
        yield pool


def test_adversarial_corpus(math_pool):
    start = time.monotonic()
    results = math_pool.score([{"answer": g} for g, _, _ in MATH_CORPUS], [c for _, c, _ in MATH_CORPUS])
    elapsed = time.monotonic() - start
    wrong = [(g, c[:60], e, r) for (g, c, e), r in zip(MATH_CORPUS, results, strict=True) if r[0] != e]
    assert not wrong, wrong
    assert elapsed < 30, elapsed
    assert not os.path.exists("/tmp/pwned_gtpo")


def test_dapo_rule():
    spec = get_reward("dapo")
    assert spec.fn({"answer": "34"}, "reasoning...\nAnswer: 34") == (1.0, {"extracted": "34"})
    assert spec.fn({"answer": "34"}, "Answer: 34\n" + "padding " * 100)[0] == -1.0  # not in the last 300 chars
    assert spec.fn({"answer": "34"}, "Answer: 33\nAnswer: 34")[0] == 1.0  # the last one counts
    assert spec.fn({"answer": "34"}, "answer : $34$")[0] == 1.0
    assert spec.fn({"answer": "34"}, "no answer line")[0] == -1.0
    assert spec.failure_score == -1.0


def test_exact_and_format_rewards():
    exact, fmt = get_reward("exact").fn, get_reward("format").fn
    assert exact({"answer": "12"}, "so \\boxed{12}")[0] == 1.0
    assert exact({"answer": "12"}, "Answer: 12")[0] == 1.0
    assert exact({"answer": "12"}, "\\boxed{12.0}")[0] == 0.0  # exact means exact
    assert exact({"answer": "12"}, "#### 12", answer_pattern=r"####\s*(\S+)")[0] == 1.0
    assert fmt({}, "... \\boxed{3}")[0] == 1.0 and fmt({}, "3")[0] == 0.0 and fmt({}, "\\boxed{}")[0] == 0.0


def test_extraction_helpers():
    assert last_boxed("\\boxed{a} \\fbox{b}") == "b"
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert answer_line("Answer: 5\nAnswer: 6") == "6"
    assert normalize_final_answer("\\text{10 dollars}") == "10"
    assert normalize_final_answer("1,000") == "1000"


def test_missing_answer_field_is_a_clear_error():
    score, info = call_reward(get_reward("math"), {"question": "q"}, "\\boxed{1}", {})
    assert score == 0.0 and "record['answer']" in info["error"] and "question" in info["error"]
    with pytest.raises(KeyError, match="did you mean 'math'"):
        get_reward("maths")


PIECES = st.sampled_from(
    ["\\boxed{", "\\fbox{", "}", "{", "\\frac", "\\sqrt", "^", "9", "10", "**", "Answer:", "\n", "####", "$",
     "\\", "\x00", "１", "(", ")", "__import__", "-", ".", "e", "x", " ", "\\infty", "!"]
)  # fmt: skip
RANDOM = st.one_of(st.text(max_size=80), st.lists(PIECES | st.text(max_size=4), max_size=40).map("".join))


@pytest.fixture(scope="module")
def all_pools():
    pools = {name: RewardPool(name, num_workers=2, timeout_s=TIMEOUT_S) for name in sorted(REWARDS)}
    yield pools
    for pool in pools.values():
        pool.close()


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(completion=RANDOM, gold=st.sampled_from(["3", "\\frac{1}{2}", "18", "x^2"]))
def test_random_strings_never_escape_or_overrun(all_pools, completion, gold):
    for name, pool in all_pools.items():
        start = time.monotonic()
        record = {"answer": gold, "numbers": [2, 3, 7, 7], "target": 17}  # every reward's fields
        [(score, info)] = pool.score([record], [completion])
        assert time.monotonic() - start < TIMEOUT_S + 1.5, (name, completion)
        assert "error" not in info, (name, completion, info)
        assert score in (0.0, 1.0, -1.0)


def test_a_hanging_item_is_killed_and_others_are_kept():
    spec = RewardSpec("slow_echo", slow_echo)
    records = [{"sleep": 0.05, "value": i} for i in range(6)]
    records[2] = {"sleep": 60, "value": 2}
    with RewardPool(spec, num_workers=2, timeout_s=1.0) as pool:
        start = time.monotonic()
        results = pool.score(records, [""] * 6)
        assert time.monotonic() - start < 4
        assert results[2] == (0.0, {"timeout": True}) and pool.timeouts == 1
        assert [r[0] for i, r in enumerate(results) if i != 2] == [0, 1, 3, 4, 5]
        assert pool.score([{"sleep": 0, "value": 9}], [""]) == [(9.0, {"item": 9})]  # replaced worker works


def test_killing_a_worker_mid_item_loses_and_misattributes_nothing():
    spec = RewardSpec("slow_echo", slow_echo)
    records = [{"sleep": 0.3, "value": i} for i in range(10)]
    with RewardPool(spec, num_workers=2, timeout_s=10.0) as pool:
        victim = pool.workers[0].process.pid
        threading.Timer(0.45, lambda: os.kill(victim, signal.SIGKILL)).start()
        results = pool.score(records, [""] * 10)
        assert pool.restarts >= 1
    assert results == [(float(i), {"item": i}) for i in range(10)]
