"""benchmarks/warmup_entropy.py's statistics, on entropies whose distribution is known by hand."""

import importlib.util

import numpy as np
import pytest
from train_helpers import ROOT

spec = importlib.util.spec_from_file_location("warmup_entropy", ROOT / "benchmarks" / "warmup_entropy.py")
warmup_entropy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(warmup_entropy)


def test_entropy_statistics_read_only_response_tokens():
    # Two responses: [0, 1, 2] and [4, 4]; the padding (9s) must not count.
    entropy = np.array([[0.0, 1.0, 2.0, 9.0], [4.0, 4.0, 9.0, 9.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    s = warmup_entropy.entropy_stats(entropy, mask)
    assert s["tokens"] == 5
    assert s["mean"] == pytest.approx(11 / 5)
    assert s["p50"] == pytest.approx(2.0)  # median of 0, 1, 2, 4, 4
    # std along [0, 1, 2] is sqrt(2/3); along [4, 4] it is 0
    assert s["within_response_std"] == pytest.approx(np.sqrt(2 / 3) / 2)
    assert s["mean_by_position"] == [2.0, 2.5, 2.0]  # position 3 holds no response token
