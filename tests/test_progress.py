"""The console progress line: under a sampling budget it counts responses, not `train.steps`."""

import io

from gtpo_jax.training import metrics as metrics_lib
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
