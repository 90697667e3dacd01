"""pass@k / avg@k estimators and the PNG curves of a run."""

import json
import math

import pytest

from gtpo_jax.plot import main as plot_main
from gtpo_jax.plot import plot, read_metrics
from gtpo_jax.training.evaluation import pass_at_k


def test_pass_at_k_unbiased_estimator_by_hand():
    assert pass_at_k(4, 1, 1) == 0.25  # 1 - C(3,1)/C(4,1) = 1 - 3/4
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))  # 1 - 21/252
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        pass_at_k(4, 1, 5)


def test_plot_writes_reward_entropy_and_length_pngs(tmp_path):
    records = [
        {
            "step": s,
            "reward_mean": s / 10,
            "pass_rate": s / 10,
            "entropy_mean": 1.0 - s / 20,
            "entropy_pos": 1.0,
            "entropy_neg": None,
            "len_mean": 3.0 + s,
            "len_max": 5.0 + s,
        }
        for s in range(1, 6)
    ]
    records.append({"step": 5, "eval/avg@4": 0.4})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    paths = plot(tmp_path)
    assert [p.name for p in paths] == ["reward.png", "entropy.png", "length.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in paths)
    assert plot_main(["plot"]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1}\n{"step": \n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: invalid JSON"):
        read_metrics(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="is .* a run directory"):
        read_metrics(tmp_path / "nothing")
