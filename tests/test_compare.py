"""`python -m gtpo_jax.compare` end to end on a tiny grid: equal budgets, resumable, the summary."""

import json
import subprocess
import sys

import numpy as np
import pytest
from train_helpers import ROOT, TINY, load_config_file

from gtpo_jax.compare import summarize, write_summary
from gtpo_jax.errors import ConfigError
from gtpo_jax.training.grid import check_saved, parse_variant, run_config, run_grid, warmup_settings

BUDGET = 48  # 3 sampling rounds of prompts_per_step x G = 4 x 4


def _values(root, **overrides):
    c = load_config_file("configs/default.py")
    settings = {
        **TINY,
        "train.run_dir": str(root),
        "train.steps": 10,
        "train.max_sampled_responses": BUDGET,
        "compare.variants": ("grpo", "dapo"),
        "compare.seeds": (0,),
        "eval.every": 0,
        "eval.every_responses": 16,  # after each of the first two sampling rounds (the third is the end)
        **overrides,
    }
    for key, value in settings.items():
        section, field = key.split(".")
        c[section][field] = value
    return c.to_dict()


def test_variants_parse_into_a_recipe_and_loss_fields():
    assert parse_variant("dapo") == ("dapo", "dapo", {})
    assert parse_variant("gtpo_joint:gtpo:gtpo_norm=joint,alpha2=0.2") == (
        "gtpo_joint",
        "gtpo",
        {"gtpo_norm": "joint", "alpha2": 0.2},
    )
    with pytest.raises(ConfigError, match="not field=value"):
        parse_variant("x:gtpo:gtpo_norm")


def test_a_variant_setting_a_field_its_recipe_does_not_read_is_refused_up_front(tmp_path):
    values = _values(tmp_path)
    with pytest.raises(ConfigError, match=r"compare.variants: 'bad:grpo:alpha2=0.5': loss.alpha2=0.5 is not read"):
        run_config(values, "bad:grpo:alpha2=0.5", 0)


def test_a_grid_needs_a_budget(tmp_path):
    with pytest.raises(ConfigError, match="train.max_sampled_responses=0"):
        run_grid(_values(tmp_path, **{"train.max_sampled_responses": 0}))
    # A budget the step limit cuts short would stop GRPO-style runs (no refills) before DAPO's.
    with pytest.raises(ConfigError, match=r"train.steps=2: 2 x 16 responses a step < train.max_sampled_responses=48"):
        run_grid(_values(tmp_path, **{"train.steps": 2}))


def test_tiny_grid_end_to_end_with_equal_budgets_and_resume(tmp_path):
    logs = []
    grid = run_grid(_values(tmp_path), log=logs.append)
    results = grid["results"]
    assert not grid["stopped"] and [r["variant"] for r in results] == ["grpo", "dapo"]
    assert {r["sampled_responses"] for r in results} == {BUDGET}  # the same budget, refills included
    by = {r["variant"]: r for r in results}
    assert by["grpo"]["steps"] == 3 and 1 <= by["dapo"]["steps"] <= 3  # DAPO's refills cost budget
    for r in results:
        assert {"greedy_pass@1", "avg@4", "pass@1", "pass@2", "pass@4"} <= set(r["final"]) <= set(r["start"]) | {""}
        assert r["start"] == results[0]["start"]  # both variants start from the same warm-up
        assert r["mean_response_tokens"] > 0 and r["wall_s"] > 0
    assert (tmp_path / "warmup" / "seed0" / "params").exists()
    # The warm-up reports progress with an ETA, and "saved" only once the parameters are written.
    warm = [i for i, line in enumerate(logs) if line.startswith("warm-up ") and " eta " in line]
    saved = [i for i, line in enumerate(logs) if "starting parameters saved to" in line]
    assert warm and len(saved) == 1 and saved[0] > warm[-1]

    again = []  # a second run skips what is finished
    assert run_grid(_values(tmp_path), log=again.append)["results"] == results
    assert all("finished earlier, skipped" in line for line in again)
    # ... but never a finished run made with other settings, nor a warm-up made by another config.
    with pytest.raises(ConfigError, match=r"other settings \(train.max_sampled_responses: 48 -> 32\)"):
        run_grid(_values(tmp_path, **{"train.max_sampled_responses": 32}))
    changed = run_config(_values(tmp_path, **{"warmup.learning_rate": 1e-2}), "grpo", 0)
    with pytest.raises(ConfigError, match=r"saved warm-up .* other settings \(warmup.learning_rate: 0.003 -> 0.01\)"):
        check_saved(
            tmp_path / "warmup" / "seed0" / "warmup_config.json",
            warmup_settings(changed, 100),
            "the saved warm-up",
            print,
        )
    # Evaluations every 16 sampled responses: GRPO's steps 1 and 2 (16 and 32), not the budget's end.
    evals = [r for r in map(json.loads, open(tmp_path / "grpo" / "seed0" / "metrics.jsonl")) if "eval/avg@4" in r]
    assert [(r["step"], r["sampled_responses"]) for r in evals] == [(1, 16.0), (2, 32.0), (3, 48.0)]

    summary = write_summary(tmp_path, results)
    assert summary["metrics"] == ["greedy_pass@1", "avg@4", "pass@4"]
    assert summary["sampled_responses"] == [BUDGET]
    assert set(summary["variants"]) == {"grpo", "dapo"} and list(summary["paired"]) == ["grpo - dapo"]
    d = summary["paired"]["grpo - dapo"]["greedy_pass@1"]["values"][0]
    assert d == pytest.approx(by["grpo"]["final"]["greedy_pass@1"] - by["dapo"]["final"]["greedy_pass@1"])
    assert json.loads((tmp_path / "summary.json").read_text())["sampled_responses"] == [BUDGET]
    assert "| grpo - dapo |" in (tmp_path / "summary.md").read_text()
    names = sorted(p.rsplit("/", 1)[-1] for p in summary["plots"])
    assert names == ["accuracy.png", "entropy.png", "length.png", "pass_at_k.png", "signs.png"]


def test_summary_statistics_by_hand():
    def run(variant, seed, greedy):
        final = {"greedy_pass@1": greedy, "avg@4": greedy, "pass@4": greedy}
        start = dict.fromkeys(final, 0.1)
        return {
            "variant": variant,
            "seed": seed,
            "final": final,
            "start": start,
            "sampled_responses": 8,
            "wall_s": 1.0,
            "mean_response_tokens": 20.0,
        }

    s = summarize([run("dapo", 0, 0.2), run("dapo", 1, 0.4), run("gtpo", 0, 0.3), run("gtpo", 1, 0.3)])
    assert s["variants"]["dapo"]["greedy_pass@1"]["mean"] == pytest.approx(0.3)
    assert s["variants"]["dapo"]["greedy_pass@1"]["std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert s["variants"]["gtpo"]["delta_greedy_pass@1"]["mean"] == pytest.approx(0.2)
    assert s["paired"]["gtpo - dapo"]["greedy_pass@1"]["values"] == pytest.approx([0.1, -0.1])


def test_the_command_line_refuses_an_unknown_field():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gtpo_jax.compare",
            f"--config={ROOT / 'configs/default.py'}",
            "--config.compare.seedz=1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 1 and "did you mean 'seeds'" in out.stderr
