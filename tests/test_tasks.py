"""Synthetic tasks: determinism, difficulty, disjoint splits, exact verifiers."""

import pytest

from gtpo_jax.data.tasks import generate
from gtpo_jax.rewards.countdown import check_countdown, countdown_reward
from gtpo_jax.rewards.registry import get_reward


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_deterministic_distinct_and_disjoint_splits(task):
    train = generate(task, 200, seed=1, difficulty=3)
    assert train == generate(task, 200, seed=1, difficulty=3)
    assert train != generate(task, 200, seed=2, difficulty=3)
    test = generate(task, 50, seed=1, difficulty=3, split="test")
    other_train = generate(task, 200, seed=7, difficulty=3)
    prompts = {r["prompt"] for r in train}
    assert len(prompts) == 200
    assert not prompts & {r["prompt"] for r in test}
    assert not {r["prompt"] for r in other_train} & {r["prompt"] for r in test}  # whatever the seed


def test_arithmetic_answers_are_right_and_difficulty_adds_operations():
    # The expression is fully parenthesised left to right: checkable with the countdown parser.
    from gtpo_jax.rewards.countdown import _Parser

    for difficulty in (1, 4):
        for r in generate("arithmetic", 30, seed=0, difficulty=difficulty):
            expression = r["prompt"].removeprefix("Compute ").split(". Put")[0]
            assert sum(expression.count(op) for op in "+*") + expression.count(" - ") == difficulty
            assert _Parser(expression).parse() == int(r["answer"])
    exact = get_reward("exact").fn
    record = generate("arithmetic", 1, seed=3)[0]
    assert exact(record, f"... \\boxed{{{record['answer']}}}")[0] == 1.0
    assert exact(record, f"... \\boxed{{{int(record['answer']) + 1}}}")[0] == 0.0


def test_countdown_targets_are_reachable_and_checked_exactly():
    record = {"numbers": [2, 3, 7, 7], "target": 17}
    assert check_countdown("2*7+3", record["numbers"], 17)[0]
    assert check_countdown("(7 + 7) + 3", record["numbers"], 17)[0]
    assert check_countdown("7 \\times 2 + 3", record["numbers"], 17)[0]
    assert not check_countdown("2*7+3+0", record["numbers"], 17)[0]  # 0 was not given
    assert not check_countdown("3*3+7+1", record["numbers"], 17)[0]  # 3 twice
    assert not check_countdown("17", record["numbers"], 17)[0]
    assert not check_countdown("(7*3)/0", record["numbers"], 17)[0]
    assert not check_countdown("__import__('os')", record["numbers"], 17)[0]
    assert not check_countdown("(" * 60 + "2" + ")" * 60, record["numbers"], 2)[0]  # too deep / too long
    assert check_countdown("7/7+2", [7, 7, 2], 3)[0]  # exact fractions
    for r in generate("countdown", 20, seed=0, difficulty=3):
        assert len(r["numbers"]) == 4 and r["target"] > 0
    assert countdown_reward(record, "so \\boxed{2*7+3}") == (1.0, {"extracted": "2*7+3", "check": "ok"})
    assert get_reward("countdown").fn(record, "\\boxed{2*7}")[0] == 0.0


def test_bad_arguments():
    with pytest.raises(KeyError, match="unknown task 'sudoku'"):
        generate("sudoku", 1)
    with pytest.raises(ValueError, match="split='dev'"):
        generate("arithmetic", 1, split="dev")
