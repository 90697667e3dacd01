"""Weights & Biases and the tables of sampled completions (training/metrics.py, training/samples.py):
two training steps logged offline and read back from the run's files; samples.jsonl whatever the
logger; with W&B off, `wandb` is never imported."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import ROOT, tiny_config

from gtpo_jax.training.loop import Trainer
from gtpo_jax.training.samples import COLUMNS, picked, response_means

SAMPLES = {"metrics.samples_every": 1, "metrics.samples_per_step": 3}
BLOCK = 32768  # the .wandb file is a LevelDB-style log of 32 KiB blocks


def wandb_records(path: Path) -> list:
    """The protobuf records of a `.wandb` file: a 7-byte header (":W&B", magic, version), then
    chunks of (crc32c: 4, length: 2, type: 1, data), type 1 = whole, 2/3/4 = first/middle/last."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, out, chunk = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def _check_samples(run_dir: Path, cfg, n: int) -> list[dict]:
    rows = _jsonl(run_dir / "samples.jsonl")
    assert [r["step"] for r in rows] == [1] * n + [2] * n
    for r in rows:
        assert list(r) == ["step", *COLUMNS]
        assert isinstance(r["prompt"], str) and r["prompt"] and isinstance(r["response"], str)
        dropped = cfg.loss.mask_truncated and r["finish_reason"] == "length"  # not counted in O+ (collect.verdicts)
        assert r["o_plus"] == (r["reward"] > cfg.loss.success_threshold and not dropped)
        assert 0 <= r["length"] <= cfg.rollout.max_new_tokens and r["finish_reason"] in ("stop", "length")
        assert r["entropy_mean"] >= 0 and np.isfinite(r["advantage_mean"])
    return rows


@pytest.mark.slow  # trains a tiny run end to end (the CI runs the slow suite too)
def test_two_steps_logged_offline_and_read_back(tmp_path, monkeypatch):
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    overrides = {"metrics.wandb_project": "test", "metrics.wandb_mode": "offline", "metrics.wandb_run_name": "two"}
    cfg = tiny_config(tmp_path, **overrides, **SAMPLES)
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
    samples = _check_samples(tmp_path, cfg, 3)
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    records = wandb_records(next(run.glob("run-*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in records]
    # The resolved config.
    (header,) = [r.run for r, k in zip(records, kinds, strict=True) if k == "run"]
    assert header.project == "test" and header.display_name == "two"
    config = {i.key: json.loads(i.value_json) for i in header.config.update}
    assert config["train"]["steps"] == 2 and config["loss"]["algorithm"] == cfg.loss.algorithm
    assert config["metrics"]["wandb_mode"] == "offline" and config["metrics"]["samples_every"] == 1
    # Every scalar of metrics.jsonl at its step.
    history = {}
    for r in (r.history for r, k in zip(records, kinds, strict=True) if k == "history"):
        history.setdefault(r.step.num, {}).update({i.key or "/".join(i.nested_key): i.value_json for i in r.item})
    assert sorted(history) == [1, 2]
    for record in _jsonl(tmp_path / "metrics.jsonl"):
        logged = history[record.pop("step")]
        for key, value in record.items():
            if value is not None:
                assert json.loads(logged[key]) == pytest.approx(value, rel=1e-6), key
    assert "loss" in history[1] and "eval/avg@4" in history[2]
    # The samples table of each step: W&B's table file holds the rows of samples.jsonl.
    for step in (1, 2):
        assert json.loads(history[step]["samples/nrows"]) == 3
        table = json.loads((run / "files" / json.loads(history[step]["samples/path"])).read_text())
        assert table["columns"] == list(COLUMNS)
        rows = [dict(zip(COLUMNS, row, strict=True)) for row in table["data"]]
        assert rows == [{c: r[c] for c in COLUMNS} for r in samples if r["step"] == step]
    assert len(list((run / "files" / "media" / "table").glob("samples_*.table.json"))) == 2


OFF = """
import json, sys
sys.path.insert(0, {tests!r})
from train_helpers import tiny_config
from gtpo_jax.training.loop import Trainer

if __name__ == "__main__":
    trainer = Trainer(tiny_config({run_dir!r}, **{samples!r}))
    try:
        trainer.run()
    finally:
        trainer.close()
    print(json.dumps({{"wandb_imported": "wandb" in sys.modules}}))
"""


@pytest.mark.slow  # trains a tiny run end to end (the CI runs the slow suite too)
def test_wandb_off_never_imports_it_and_samples_still_written(tmp_path):
    script = tmp_path / "off.py"
    script.write_text(textwrap.dedent(OFF.format(tests=str(ROOT / "tests"), run_dir=str(tmp_path), samples=SAMPLES)))
    # The package from this checkout, installed or not (a script's own folder leads sys.path, not cwd).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"wandb_imported": False}
    assert not (tmp_path / "wandb").exists()
    _check_samples(tmp_path, tiny_config(tmp_path), 3)


def test_samples_spread_over_the_groups():
    assert picked(3, 4, 5) == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1)]
    assert len(picked(2, 2, 10)) == 4  # at most every response once


def test_response_means_over_each_responses_tokens():
    mask = jnp.asarray([[[1, 1, 0], [1, 0, 0]]], bool)  # [P=1, G=2, T=3]
    entropy = jnp.asarray([[[1.0, 3.0, 9.0], [4.0, 9.0, 9.0]]])
    entropy_mean, advantage_mean = response_means(entropy, 2 * entropy, mask)
    np.testing.assert_allclose(entropy_mean, [[2.0, 4.0]])
    np.testing.assert_allclose(advantage_mean, [[4.0, 8.0]])
    sequence = jnp.asarray([[0.5, -0.5]])  # a sequence recipe's [P, G] advantages, as they are
    np.testing.assert_allclose(response_means(entropy, sequence, mask)[1], sequence)
