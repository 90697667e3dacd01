"""The console progress line and the evaluation cadence: under a sampling budget they count
responses, not `train.steps`."""

import io
import json

from gtpo_jax.config import from_dict
from gtpo_jax.training import metrics as metrics_lib
from gtpo_jax.training.loop import eval_due, rounds_left
from gtpo_jax.training.metrics import MetricsWriter


def _lines(writer: MetricsWriter, records, clock, monkeypatch) -> list[str]:
    out = []
    for step, (t, record) in enumerate(zip(clock, records, strict=True), start=1):
        monkeypatch.setattr(metrics_lib.time, "time", lambda t=t: t)
        writer.progress(step, record, ())
        out.append(writer.stream.getvalue().splitlines()[-1])
    return out


def test_budget_progress_counts_responses_and_its_eta(tmp_path, monkeypatch):
    # 1000 steps configured, but a budget of 4096 responses ends the run after ~16 steps of 256.
    w = MetricsWriter(tmp_path, 1000, tensorboard=False, stream=io.StringIO(), budget=4096)
    records = [{"sampled_responses": 256.0}, {"sampled_responses": 768.0}, {"sampled_responses": 1024.0}]
    lines = _lines(w, records, clock=[100.0, 102.0, 104.0], monkeypatch=monkeypatch)
    assert "1 steps, 256/4096 responses   6%" in lines[0] and "eta ?" in lines[0]
    # 768 responses in 4 s since the first line: 192 a second, 3072 left -> 16 s.
    assert "3 steps, 1024/4096 responses  25%" in lines[2] and "eta 0m16s" in lines[2]


def test_step_progress_without_a_budget(tmp_path, monkeypatch):
    w = MetricsWriter(tmp_path, 10, tensorboard=False, stream=io.StringIO())
    lines = _lines(w, [{}, {}, {}], clock=[0.0, 3.0, 6.0], monkeypatch=monkeypatch)
    # 2 steps in 6 s since step 1: 3 s a step, 7 steps left -> 21 s.
    assert "3/10  30%" in lines[2] and "eta 0m21s" in lines[2]


def _due_steps(eval_fields, per_step, budget, steps=1000):
    """The steps after which `eval_due` evaluates, for a run sampling `per_step[i]` prompts (G = 16)."""
    cfg = from_dict(
        {
            "eval": eval_fields,
            "loss": {"group_size": 16},
            "train": {"steps": steps, "prompts_per_step": 16, "max_sampled_responses": budget},
        }
    )
    due, sampled = [], 0
    for step, prompts in enumerate(per_step, start=1):
        sampled += prompts * 16
        record = {"sampled_responses": float(sampled), "prompts_sampled": float(prompts)}
        if eval_due(cfg, step, record, rounds_left(cfg, sampled)):
            due.append(step)
    return due


def test_evaluation_every_n_responses_is_the_same_x_for_every_sampling_pattern():
    # 256 responses a step (GRPO): 8192 = every 32 steps; the budget's end (128 steps) is left to
    # the final evaluation.
    assert _due_steps({"every_responses": 8192}, [16] * 128, budget=32768) == [32, 64, 96]
    # DAPO-like refills (16, 32 or 48 prompts a step): evaluated at the step that passes each
    # multiple of 8192, once per multiple even when a step passes it by several thousand.
    pattern = [16, 32, 48, 16] * 40
    due = _due_steps({"every_responses": 8192}, pattern, budget=32768)
    totals = [16 * sum(pattern[:s]) for s in due]
    assert len(due) == 3 and all(t >= m and t - 768 < m for t, m in zip(totals, [8192, 16384, 24576], strict=True))
    # The step cadence is unchanged, except that the budget's last step has the final evaluation.
    assert _due_steps({"every": 20}, [16] * 128, budget=32768) == [20, 40, 60, 80, 100, 120]
    assert _due_steps({"every": 20}, [16] * 40, budget=0, steps=40) == [20]


def test_a_resume_drops_the_records_the_killed_run_logged_past_its_checkpoint(tmp_path):
    w = MetricsWriter(tmp_path, 10, tensorboard=False, stream=io.StringIO())
    for step in range(1, 6):
        w.write(step, {"loss": float(step)})
    w.rewind(3)  # restored at step 3: steps 4 and 5 are logged again by the resumed run
    w.write(4, {"loss": 40.0})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and "dropped 2 records after step 3" in w.stream.getvalue()
    w.rewind(-1)  # a fresh start in the same directory keeps nothing of the earlier run
    w.write(1, {"loss": 1.0})
    w.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
