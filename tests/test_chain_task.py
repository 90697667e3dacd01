"""The `chain` task: deterministic disjoint splits, right written steps, a reward that reads only
the final answer, and a warm-up that teaches the written solution."""

import re

import pytest

from gtpo_jax.data.tasks import generate
from gtpo_jax.data.tokenizer import TASK_ALPHABET, CharTokenizer
from gtpo_jax.rewards.chain import chain_reward, final_answer
from gtpo_jax.rewards.registry import get_reward
from gtpo_jax.training import warmup

STEP = re.compile(r"(-?\d+)([+\-*])(\d)=(-?\d+)")


def test_deterministic_and_train_test_disjoint():
    common = dict(seed=1, difficulty=3, operations="+-", prompt_style="compact")
    train = generate("chain", 300, **common)
    assert train == generate("chain", 300, **common)
    assert train != generate("chain", 300, **{**common, "seed": 2})
    test = generate("chain", 100, split="test", **common)
    other = generate("chain", 300, **{**common, "seed": 5})
    assert len({r["prompt"] for r in train}) == 300
    assert not {r["prompt"] for r in train + other} & {r["prompt"] for r in test}


def test_steps_are_right_and_end_in_the_answer():
    for difficulty, operations in ((1, "+-"), (3, "+-"), (4, "+-*")):
        for r in generate("chain", 50, seed=0, difficulty=difficulty, operations=operations, prompt_style="compact"):
            steps, _, final = r["solution"].partition(">")
            assert final == r["answer"]
            parts = steps.split(",")
            assert len(parts) == difficulty
            previous, shown = None, ""
            for part in parts:
                a, op, b, result = STEP.fullmatch(part).groups()
                shown += (a if previous is None else "") + op + b
                a, b, result = int(a), int(b), int(result)
                assert result == (a + b if op == "+" else a - b if op == "-" else a * b)
                assert previous is None or a == previous  # each step starts from the last result
                previous = result
            assert previous == int(r["answer"])
            # The prompt's digits and operators are the chain's, in order.
            assert r["prompt"].replace("(", "").replace(")", "") == shown


def test_reward_reads_only_the_answer_after_the_last_arrow():
    record = {"answer": "18"}
    assert get_reward("chain").fn is chain_reward
    assert chain_reward(record, "7+5=12,12-3=9,9+9=18>18")[0] == 1.0
    assert chain_reward(record, "wrong steps 1+1=3>18")[0] == 1.0  # steps are not checked
    assert chain_reward(record, ">18")[0] == 1.0
    assert chain_reward(record, "7+5=12>12,12+6=18> 18 ")[0] == 1.0
    assert chain_reward(record, "7+5=12,12-3=9,9+9=18>17")[0] == 0.0
    assert chain_reward(record, "9+9=18>18,0")[0] == 0.0  # the last > is followed by no bare integer
    assert chain_reward(record, "9+9=18>18>")[0] == 0.0
    assert chain_reward(record, "9+9=18")[0] == 0.0  # no >
    assert chain_reward({"answer": "-4"}, "2-6=-4>-4")[0] == 1.0
    for malformed in ("", ">", ">--4", ">1" + "9" * 5000, "\x00>\ufffd", ">18.0", ">+18"):
        score, _ = chain_reward(record, malformed)
        assert score == 0.0
    assert chain_reward({"answer": "n/a"}, ">3")[0] == 0.0  # a broken record scores 0, never raises
    assert final_answer("1+2=3>3") == 3 and final_answer("3") is None


def test_warmup_trains_on_the_solution_when_the_record_has_one(monkeypatch):
    record = generate("chain", 1, seed=0, difficulty=3, operations="+-", prompt_style="compact")[0]
    assert warmup.reference_text(record) == record["solution"]
    assert warmup.reference_text({"prompt": "(1+2)", "answer": "3"}) == "3"
    assert warmup.reference_text({"answer": "3", "solution": ""}) == "3"
    # supervised_warmup hands reference_text(record) to the tokens it trains on.
    taught = []

    class Stop(Exception):
        pass

    def fake_answer_tokens(tok, texts, width):
        taught.extend(texts)
        raise Stop

    monkeypatch.setattr(warmup, "answer_tokens", fake_answer_tokens)
    tok = CharTokenizer(TASK_ALPHABET)
    cfg = warmup.WarmupSection(steps=1, batch_size=1)
    with pytest.raises(Stop):
        warmup.supervised_warmup(
            None, {}, [record], lambda r: tok.encode(r["prompt"]), tok, cfg, seed=0, width=32, buckets=(16,)
        )
    assert taught == [record["solution"]]
