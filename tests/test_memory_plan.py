"""benchmarks/memory_plan.py compiles the four phases of a step on 4 fake devices and prints one
JSON line per phase whose bytes add up, whose arguments hold the parameter shards, and whose
predicted time follows from the analytic FLOPs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"per_device_bytes", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "fits", "hbm_gib"}
KEYS |= {"xla_flops", "analytic_flops", "predicted_seconds", "calls_per_step", "compile_seconds", "mesh", "shapes"}


@pytest.fixture(scope="module")
def records():
    args = [sys.executable, str(ROOT / "benchmarks/memory_plan.py"), f"--config={ROOT / 'configs/default.py'}"]
    args += ["--devices=4", "--hbm_gib=0.004", "--rollout_batch_size=64", "--config.train.micro_batch_size=64"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {r["phase"]: r for r in map(json.loads, out.stdout.splitlines())}


def test_one_line_per_phase_with_every_field(records):
    assert list(records) == ["rollout", "score", "prepare", "update"]
    for r in records.values():
        assert KEYS <= set(r), KEYS - set(r)
        assert r["devices"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}


def test_bytes_add_up_and_fits_compares_with_the_hbm(records):
    for r in records.values():
        total = r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
        assert r["per_device_bytes"] == total > 0
        assert r["resident_bytes"] == sum(r["resident"].values()) > 0
        assert r["fits"] == (total + r["resident_bytes"] <= 0.004 * 2**30)


def test_fits_counts_what_stays_resident_during_each_phase(records):
    """AdamW's two moments stay on the device while the sampler and the scoring pass run (their
    arguments hold only the parameters); the step's rollout stays through the step; the update
    takes its mini-batch from the whole step's loss batch, and donates its state (the new state
    reuses the old one's buffers: counted once)."""
    params = records["rollout"]["param_bytes_per_device"]
    for phase in ("rollout", "score", "prepare"):
        assert records[phase]["resident"]["opt_state"] == pytest.approx(2 * params, rel=0.01)
    assert records["prepare"]["resident"]["params"] == params  # not its argument: resident
    assert set(records["update"]["resident"]) == {"rollout", "step_batch"}  # no KL reference: kl_coef 0
    # The rollout of the step: 16 prompts x G = 8 sequences of T = 5 tokens, 9 bytes a token
    # (int32 token, bool mask, float32 log-prob) and 8 a sequence (length, finish reason), over 4 devices;
    # while sampling, the other call's half.
    rollout = 16 * 8 * (9 * 5 + 8) // 4
    assert records["score"]["resident"]["rollout"] == records["update"]["resident"]["rollout"] == rollout
    assert records["rollout"]["resident"]["rollout"] == rollout // 2
    assert records["update"]["alias_bytes"] >= 3 * params  # the donated state
    # The tiny model's sampler fits in 4 MiB, its update (three copies of the parameters and more) does not.
    assert records["rollout"]["fits"] and not records["update"]["fits"]


def test_score_and_prepare_outputs_are_split_by_rows(records):
    """The scoring pass's log-probs and entropies (16 x 8 x 5 float32 each) and `prepare`'s loss
    batch leave their programs split over the 4 devices: the gather of the real rows after the
    micro-batches once left them whole on every device (5,136 output bytes, now 1,296)."""
    whole = 2 * 16 * 8 * 5 * 4
    assert whole // 4 <= records["score"]["output_bytes"] <= whole // 4 + 64
    # The update's resident step batch is the groups and the loss batch, both a quarter per device;
    # a whole loss batch alone would be several times that.
    groups = (16 * 16 * 5 + 16 * 8 * 5 * 5) // 4  # int32 + bool prompts, tokens and mask
    loss_batch = records["update"]["resident"]["step_batch"] - groups
    assert loss_batch <= records["prepare"]["output_bytes"] <= loss_batch + 512  # plus scalar diagnostics


def test_arguments_hold_a_quarter_of_the_parameters(records):
    r = records["rollout"]
    params, whole = r["param_bytes_per_device"], r["params"] * 4  # float32
    # Split 4 ways over fsdp (a few small ones, the norms, replicated).
    assert whole / 4 <= params < whole / 4 * 1.05
    assert params <= r["argument_bytes"] < params * 1.05  # plus the prompts and the key
    # The update's arguments are the parameters and AdamW's two moments, and the mini-batch.
    assert 3 * params <= records["update"]["argument_bytes"] < 3 * params * 1.2


def test_shapes_follow_the_config_and_flags(records):
    s = records["rollout"]["shapes"]
    assert s == {
        "group_size": 8,
        "prompt_len": 16,
        "response_len": 5,
        "rollout_prompts": 8,  # 64 sequences per sampler call / G
        "rollout_calls": 2,  # 16 prompts x 8 / 64
        "score_prompts": 16,
        "update_calls": 1,
        "micro_rows": 64,  # train.micro_batch_size
        "batch_width": 4,
    }
    assert records["update"]["micro_batch_size"] == records["update"]["padded_micro_rows"] == 64


def test_predicted_seconds_are_the_analytic_flops_at_the_stated_mfu(records):
    for r in records.values():
        want = r["calls_per_step"] * r["analytic_flops"] / (4 * r["peak_tflops"] * 1e12 * r["mfu"])
        assert r["predicted_seconds"] == pytest.approx(want, rel=1e-3)
    # XLA counts each loop body once: the decode loop's work is far above its count.
    assert records["rollout"]["analytic_flops"] > 4 * records["rollout"]["xla_flops"]
