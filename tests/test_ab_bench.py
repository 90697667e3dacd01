"""benchmarks/ab_bench.py: a ratio only when both commits did the same work."""

import importlib.util

from train_helpers import ROOT

spec = importlib.util.spec_from_file_location("ab_bench", ROOT / "benchmarks" / "ab_bench.py")
ab_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ab_bench)


def _row(side, wall, work, speed=None):
    return {"workload": "w", "side": side, "wall_s": wall, "work": work, "speed": speed or {}}


def test_same_work_gives_medians_and_ratios():
    rows = [
        _row("baseline", 10.0, {"steps": 3}, {"tiny": 100.0}),
        _row("current", 8.0, {"steps": 3}, {"tiny": 120.0}),
        _row("current", 9.0, {"steps": 3}, {"tiny": 130.0}),
        _row("baseline", 12.0, {"steps": 3}, {"tiny": 110.0}),
    ]
    out = ab_bench.summarise("w", rows, "aaa", "bbb")
    assert out["same_work"] and out["work"] == {"steps": 3}
    assert out["baseline_wall_s"] == 11.0 and out["current_wall_s"] == 8.5
    assert out["current_wall_over_baseline"] == round(8.5 / 11.0, 3)
    assert out["tiny_tokens_per_s"] == {"baseline": 105.0, "current": 125.0}
    assert out["tiny_current_over_baseline"] == round(125 / 105, 3)


def test_different_work_is_reported_without_a_ratio():
    rows = [_row("baseline", 10.0, {"steps": 3}, {"tiny": 1.0}), _row("current", 5.0, {"steps": 2}, {"tiny": 9.0})]
    out = ab_bench.summarise("w", rows, "aaa", "bbb")
    assert not out["same_work"]
    assert out["work"] == {"baseline": [{"steps": 3}], "current": [{"steps": 2}]}
    assert not any(k.endswith("over_baseline") for k in out)
