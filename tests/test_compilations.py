"""After its first step a run compiles nothing new (issue 18): dynamic sampling's refills and the
periodic evaluation reuse the first step's programs. `CompileCounter` counts jax's compilations;
the trainer records them per step (`compilations`) and warns about any after the first."""

import json

import jax
import jax.numpy as jnp
from train_helpers import tiny_config

from gtpo_jax.training.loop import Trainer, recompiled
from gtpo_jax.training.metrics import CompileCounter


def test_the_counter_sees_each_new_shape_once():
    def double_plus_one(x):
        return x * 2 + 1

    f = jax.jit(double_plus_one)
    x3, y3, x4, x5 = (jnp.ones(n) for n in (3, 3, 4, 5))  # made outside: creating them compiles too
    with CompileCounter() as counter:
        f(x3)
        assert counter.take() == ["jit(double_plus_one)"]
        f(y3)  # the same shape: cached
        assert counter.take() == []
        assert counter.again() == []
        f(x4)  # a new shape: compiled again
        assert counter.take() == ["jit(double_plus_one)"]
        assert counter.again() == ["jit(double_plus_one)"]  # a recompilation, not a first compile
        g = jax.jit(lambda x: x - 1)
        g(x4)
        assert counter.take() == ["jit(<lambda>)"] and counter.again() == []  # compiled for the first time
    f(x5)  # outside: not counted
    assert counter.names == ["jit(double_plus_one)"] * 2 + ["jit(<lambda>)"]
    assert "step 3 compiled again, for new input shapes: a, b;" in recompiled(3, ["a", "b"])


def test_refills_and_evaluations_compile_nothing_after_the_first_step(tmp_path):
    overrides = {"loss.algorithm": "dapo", "rollout.max_refill_rounds": 2, "train.steps": 4, "eval.every": 1}
    overrides |= {"train.length_buckets": 1, "train.log_every": 1}  # one response width: no new bucket
    trainer = Trainer(tiny_config(tmp_path, **overrides))
    try:
        trainer.run()
    finally:
        trainer.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in records if "compilations" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["compilations"] > 0  # the warm-up, the evaluation, the step's programs
    assert [r["compilations"] for r in steps[1:]] == [0, 0, 0]
    assert sum(r["sampling_rounds"] for r in steps[1:]) > 3  # refills happened after step 1
    assert all("eval/avg@4" in r for r in steps[:-1])  # and an evaluation after every step (the last
    # step's is the final evaluation's record)
