"""The RL trainer end to end on the tiny default: every algorithm, exact resume, preemption,
non-finite gradients, and checkpoints restored onto other meshes."""

import json
import signal
import time
from dataclasses import replace

import jax
import numpy as np
import pytest
from config_reads import ConfigReads
from train_helpers import cli, popen, tiny_config

from gtpo_jax.config import section_fields
from gtpo_jax.models.sharding import make_mesh
from gtpo_jax.plot import plot
from gtpo_jax.training.build import build, reward_pool
from gtpo_jax.training.checkpoint import Checkpointer, abstract_params
from gtpo_jax.training.collect import check_reward_health
from gtpo_jax.training.evaluation import evaluate
from gtpo_jax.training.loop import Trainer, load_data
from gtpo_jax.training.state import make_optimizer


def _params(run_dir, step):
    """Parameters of checkpoint `step` as numpy arrays (read back without a trainer)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(run_dir / "checkpoints" / str(step) / "state")
    return jax.tree.map(np.asarray, restored["params"])


def _records(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


# GRPO's run also exercises PPO epochs, mini- and micro-batches and periodic evaluation, and
# proves that the code reads every config field.
EXTRA = {
    "grpo": {
        "eval.every": 1,
        "train.ppo_epochs": 2,
        "train.mini_batches": 2,
        "train.micro_batch_size": 4,  # 2 micro-batches of a 2-prompt mini-batch (G = 4)
        "loss.dynamic_sampling": True,  # reads rollout.max_refill_rounds
    },
    # The presets train without dynamic sampling (their papers' setting); a two-step tiny run can
    # then draw a step with no informative group, which is an empty update with no loss. The
    # test asserts a loss at every step, so it refills as DAPO does.
    **{preset: {"loss.dynamic_sampling": True} for preset in ("rloo", "dr_grpo", "gspo")},
}


# What an evaluation at eval.samples = 4 reports (training/evaluation.py).
EVAL_KEYS = {"avg@4", "pass@1", "pass@2", "pass@4", "greedy_pass@1", "prompts", "reward_invalid_frac"}


# rloo and dr_grpo add nothing the trainer sees that the others lack (a token-level advantage,
# an existing aggregation): slow, to keep the default suite within its time.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "algorithm",
    ["grpo", "dapo", "gtpo", "grpo_s", "gspo", pytest.param("rloo", marks=SLOW), pytest.param("dr_grpo", marks=SLOW)],
)
def test_each_algorithm_runs_two_steps(tmp_path, algorithm):
    reads = ConfigReads()
    cfg = reads.track(tiny_config(tmp_path, **{"loss.algorithm": algorithm, **EXTRA.get(algorithm, {})}))
    with reads:
        trainer = Trainer(cfg)
        try:
            result = trainer.run()
        finally:
            trainer.close()
        if algorithm == "grpo":
            (tmp_path / "d.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
            path = str(tmp_path / "d.jsonl")
            load_data(
                reads.track(
                    tiny_config(tmp_path, **{"data.source": "jsonl", "data.path": path, "data.test_path": path})
                )
            )
            make_optimizer(replace(cfg.optim, schedule="cosine"), 10)
            # reward.max_invalid_frac is read only when a step has invalid rewards (none in this run).
            rates = {"reward_invalid_rate": 0.25, "reward_error_rate": 0.25, "reward_timeout_rate": 0.0}
            check_reward_health({**rates, "reward_crash_rate": 0.0}, "", cfg.reward, 1)  # 25% <= 50%: a warning
    if algorithm == "grpo":
        assert sorted(section_fields() - reads.fields) == []
        assert any("eval/avg@4" in r for r in _records(tmp_path) if r["step"] == 1)
        assert [p.name for p in plot(tmp_path)] == ["reward.png", "entropy.png", "length.png"]
    steps = [r for r in _records(tmp_path) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) and r["skipped_updates"] == 0
        assert 0 <= r["reward_mean"] <= 1 and r["len_mean"] >= 1 and "clip_frac_high" in r and "entropy_mean" in r
        assert ("kl" in r) == (algorithm == "grpo")  # only GRPO's recipe has a KL term (and a reference)
        # Everything sampled (before dynamic sampling) is reported beside the kept groups' rates,
        # and so are reward failures, empty updates, wrong-sign fractions and the shaping's size.
        assert 0 <= r["sampled_pass_rate"] <= 1 and r["reward_invalid_rate"] == 0 and r["empty_updates"] == 0
        assert "wrong_sign_pos" in r and "wrong_sign_neg" in r
        assert ("shaping_delta" in r) == (algorithm in ("gtpo", "grpo_s"))
    assert set(result["final_eval"]) == EVAL_KEYS
    assert (tmp_path / "reference").exists() == (algorithm == "grpo")
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 2


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    settings = {"train.steps": 6, "train.checkpoint_every": 3}
    trainer = Trainer(tiny_config(straight, **settings))
    trainer.run()
    trainer.close()
    proc = popen(cli(killed, **settings), tmp_path / "first.log")
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "3" / "state").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-2000:]
    assert Checkpointer(killed / "checkpoints").latest_step() == 3  # killed before it finished
    trainer = Trainer(tiny_config(killed, **settings))
    trainer.run()
    trainer.close()
    a, b = _params(straight, 6), _params(killed, 6)
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
    assert not jax.tree.all(jax.tree.map(np.array_equal, a, _params(straight, 3)))  # training moved them


def test_sigterm_checkpoints_and_the_next_run_resumes(tmp_path):
    proc = popen(cli(tmp_path, **{"train.steps": 10_000}), tmp_path / "run.log")
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "0").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    log = (tmp_path / "run.log").read_text()
    stopped = Checkpointer(tmp_path / "checkpoints").latest_step()
    # SIGTERM during a rollout stops before its update; after an update, at that step.
    assert f"stopping at step {stopped} (SIGTERM)" in log and stopped >= 0
    trainer = Trainer(tiny_config(tmp_path, **{"train.steps": stopped + 1}))
    result = trainer.run()
    trainer.close()
    assert int(trainer.state.step) == stopped + 1 and "final_eval" in result


def test_non_finite_gradient_is_skipped_and_counted(tmp_path):
    # Plain GRPO without dynamic sampling: every response token is in the loss, even untrained.
    cfg = tiny_config(tmp_path, **{"loss.algorithm": "grpo", "loss.kl_coef": 0.0, "train.prompts_per_step": 16})
    trainer = Trainer(cfg)
    try:
        same_id = [trainer.built.encode({"id": "1", "prompt": p}) for p in ("1+2", "3+4")]
        assert same_id[0] != same_id[1]  # the prompt cache is not keyed by (possibly shared) ids
        trainer.warmup()  # some correct answers, so a normal update has a gradient
        _, groups, loss_batch, _ = trainer.rollout()
        before = jax.tree.map(np.asarray, trainer.state.params)
        valid = np.argwhere(np.asarray(loss_batch.mask) > 0)[0]
        poisoned = loss_batch._replace(advantages=loss_batch.advantages.at[tuple(valid)].set(np.nan))
        metrics = trainer.update(groups, poisoned)
        assert metrics["skipped_updates"] == 1 and int(trainer.state.skipped) == 1
        assert jax.tree.all(jax.tree.map(np.array_equal, before, jax.tree.map(np.asarray, trainer.state.params)))
        record = trainer.step()  # training goes on
        assert record["skipped_updates"] == 1 and np.isfinite(record["loss"]) and record["grad_norm"] > 0
        assert not jax.tree.all(jax.tree.map(np.array_equal, before, jax.tree.map(np.asarray, trainer.state.params)))
    finally:
        trainer.close()


def test_checkpoint_from_8_devices_restores_onto_4_and_1(tmp_path):
    assert jax.device_count() == 8
    cfg = tiny_config(tmp_path, **{"train.steps": 1, "train.prompts_per_step": 8})
    trainer = Trainer(cfg, mesh=make_mesh(fsdp=8))
    trainer.run()
    trainer.close()
    saved = jax.tree.map(np.asarray, trainer.state.params)
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(trainer.state.params))
    for n in (4, 1):
        mesh = make_mesh(fsdp=n, devices=jax.devices()[:n])
        if n == 4:  # a resumed training run: the whole state
            other = Trainer(cfg, mesh=mesh)
            assert other.restore() == 1
            params, step = other.state.params, int(other.state.step)
            other.close()
        else:  # what `python -m gtpo_jax.evaluate` runs: no optimizer, only the parameters are read
            run = build(cfg, mesh, train=False)
            assert run.optimizer is None and run.fns is None
            ckpt = Checkpointer(tmp_path / "checkpoints")
            step = ckpt.latest_step()
            params, _ = ckpt.restore_params(step, abstract_params(run.model, mesh))
            ckpt.close()
        leaves = jax.tree.leaves(params)
        assert all(x.sharding.device_set <= set(jax.devices()[:n]) for x in leaves)
        assert jax.tree.all(jax.tree.map(np.array_equal, saved, jax.tree.map(np.asarray, params)))
        assert step == 1
        if n == 1:
            _, test = load_data(cfg)
            pool = reward_pool(cfg, [], test)
            result = evaluate(run, params, pool, test, samples=4, num_prompts=4)
            pool.close()
            assert set(result) == EVAL_KEYS
            assert 0 <= result["avg@4"] <= 1 and result["reward_invalid_frac"] == 0


def test_training_and_evaluation_run_under_the_mesh(tmp_path, monkeypatch):
    """`Trainer.run` and `evaluate` (what `python -m gtpo_jax.evaluate` calls) trace the model under
    `jax.set_mesh(run.mesh)`: `shard_rows` pins the activations' rows to the 8 devices' batch axes,
    the layout `benchmarks/memory_plan.py` plans (without a mesh set it does nothing)."""
    from gtpo_jax.models import transformer

    seen, shard_rows = [], transformer.shard_rows

    def recording(x, axis=0):  # the mesh each traced forward pass sees
        mesh = jax.sharding.get_abstract_mesh()
        seen.append((x.shape[axis], None if mesh.empty else dict(mesh.shape)))
        return shard_rows(x, axis)

    monkeypatch.setattr(transformer, "shard_rows", recording)
    jax.clear_caches()  # trace again: an earlier test's programs would skip the recorder
    cfg = tiny_config(tmp_path, **{"train.steps": 1, "warmup.steps": 0, "train.prompts_per_step": 8})
    trainer = Trainer(cfg)
    try:
        trainer.run()
        assert jax.sharding.get_abstract_mesh().empty  # only while the run runs
        # Prefills of 8 prompts; decodes, scoring and the update of 8 prompts x 4 samples.
        assert {r for r, _ in seen} == {8, 32}, seen
        assert all(mesh == {"data": 1, "fsdp": 8, "tensor": 1} for _, mesh in seen), seen
        seen.clear()
        jax.clear_caches()
        _, test = load_data(cfg)
        result = evaluate(trainer.built, trainer.state.params, trainer.pool, test, num_prompts=4)
        assert set(result) == EVAL_KEYS and seen
        assert all(mesh == {"data": 1, "fsdp": 8, "tensor": 1} for _, mesh in seen), seen
    finally:
        trainer.close()
