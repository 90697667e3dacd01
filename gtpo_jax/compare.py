"""Compare algorithms over seeds at an equal sampling budget: one command, a measured answer.

    python -m gtpo_jax.compare --config=configs/compare_cot.py [--config.compare.seeds=0,1]

The grid is `compare.variants` x `compare.seeds` (`training/grid.py`). For each seed a supervised
warm-up runs once and is saved; every variant of that seed starts RL from those parameters and
stops after the same number of *sampled responses* (`train.max_sampled_responses`; refills of
dynamic sampling count, so DAPO-style variants take fewer steps). Everything else (learning rate,
G, prompts per step, evaluation) is the config's, shared by all variants.

Under the grid's root (`train.run_dir`):

    warmup/seed<s>/params        the warm-up's parameters, shared by the seed's variants
    <variant>/seed<s>/           one RL run: checkpoints, metrics.jsonl, result.json
    summary.json, summary.md     every run's result, mean +- std per variant, paired differences
    plots/*.png                  accuracy vs sampled responses, entropy of O+ / O-, length,
                                 pass@k vs k, wrong-sign and shaping figures

Resumable: a finished run (`result.json`) is skipped, an interrupted one resumes from its latest
checkpoint when the same command runs again. Progress and an ETA for the grid follow each run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)

# The variant every other one is paired with (the hyperparameters are chosen on it).
BASELINE = "dapo"


def headline_metrics(results: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """Greedy pass@1, and avg@k and pass@k at the evaluation's k (`eval.samples`)."""
    k = next(key[4:] for key in results[0]["final"] if key.startswith("avg@"))
    return ("greedy_pass@1", f"avg@{k}", f"pass@{k}")


def _stats(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: mean +- std over seeds of each headline metric at the end (and of its change
    from the start), and the paired per-seed difference of every variant from `BASELINE`."""
    metrics = headline_metrics(results)
    variants = list(dict.fromkeys(r["variant"] for r in results))
    by = {(r["variant"], r["seed"]): r for r in results}
    table = {}
    for v in variants:
        runs = [r for r in results if r["variant"] == v]
        row = {m: _stats([r["final"].get(m, np.nan) for r in runs]) for m in metrics}
        row |= {
            f"delta_{m}": _stats([r["final"].get(m, np.nan) - r["start"].get(m, np.nan) for r in runs]) for m in metrics
        }
        table[v] = row | {
            "seeds": [r["seed"] for r in runs],
            "wall_s": _stats([r["wall_s"] for r in runs]),
            "mean_response_tokens": _stats([r["mean_response_tokens"] for r in runs]),
        }
    paired = {}
    for v in variants if BASELINE in variants else []:
        seeds = sorted(s for (name, s) in by if name == v and (BASELINE, s) in by)
        if v != BASELINE and seeds:
            diff = {
                m: [by[(v, s)]["final"].get(m, np.nan) - by[(BASELINE, s)]["final"].get(m, np.nan) for s in seeds]
                for m in metrics
            }
            paired[f"{v} - {BASELINE}"] = {"seeds": seeds, **{m: _stats(d) for m, d in diff.items()}}
    budgets = sorted({r["sampled_responses"] for r in results})
    return {
        "metrics": list(metrics),
        "sampled_responses": budgets,
        "variants": table,
        "paired": paired,
        "runs": list(results),
    }


def markdown(summary: dict[str, Any]) -> str:
    """The summary as two Markdown tables: per variant, and paired differences from the baseline."""
    metrics = summary["metrics"]
    pct = lambda s: f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"  # noqa: E731
    head = [
        "variant",
        "seeds",
        *[f"final {m} (%)" for m in metrics],
        *[f"Δ {m} (points)" for m in metrics],
        "response tokens",
        "wall s, mean (max)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for v, row in summary["variants"].items():
        cells = [
            v,
            str(len(row["seeds"])),
            *[pct(row[m]) for m in metrics],
            *[pct(row[f"delta_{m}"]) for m in metrics],
            f"{row['mean_response_tokens']['mean']:.1f}",
            f"{row['wall_s']['mean']:.0f} ({max(row['wall_s']['values']):.0f})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    budget = summary["sampled_responses"]
    lines += ["", f"Paired differences at the end, per seed (points), budget {budget} sampled responses:", ""]
    lines += ["| difference | " + " | ".join(metrics) + " |", "|" + " --- |" * (len(metrics) + 1)]
    for name, d in summary["paired"].items():
        per_seed = [
            ", ".join(f"{100 * x:+.1f}" for x in d[m]["values"]) + f" (mean {100 * d[m]['mean']:+.1f})" for m in metrics
        ]
        lines.append(f"| {name} | " + " | ".join(per_seed) + " |")
    return "\n".join(lines) + "\n"


def write_summary(root: str | Path, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Writes `summary.json`, `summary.md` and the plots under `root`; returns the summary."""
    from gtpo_jax.plot import plot_grid

    root = Path(root)
    summary = summarize(results)
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    (root / "summary.md").write_text(markdown(summary))
    summary["plots"] = [str(p) for p in plot_grid(root, results)]
    return summary


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; set fields with --config.section.field=value")
    from absl import logging

    from gtpo_jax.errors import ConfigError
    from gtpo_jax.training.grid import run_grid

    if not flags.FLAGS["verbosity"].present:  # warnings only, unless the user asks (--verbosity=0: INFO)
        logging.set_verbosity(logging.WARNING)
    try:
        grid = run_grid(_CONFIG.value.to_dict(), log=lambda text: print(text, flush=True))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if grid["results"]:
        write_summary(grid["root"], grid["results"])
        print((Path(grid["root"]) / "summary.md").read_text())


if __name__ == "__main__":
    from gtpo_jax.config import exit_on_unknown_overrides

    exit_on_unknown_overrides(sys.argv[1:])
    app.run(main)
