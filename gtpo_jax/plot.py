"""PNG curves of a run: reward, entropy and response length per step.

    python -m gtpo_jax.plot RUN_DIR        # writes RUN_DIR/plots/{reward,entropy,length}.png

Reads `RUN_DIR/metrics.jsonl` (one record per step). The entropy plot shows the mean token
entropy of correct (O+) and wrong (O-) responses separately: the paper's "entropy rebound"
under GTPO is read from it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

PANELS = {
    "reward": ("reward_mean", "pass_rate", "eval/avg@4", "eval/pass@4"),
    "entropy": ("entropy_mean", "entropy_pos", "entropy_neg"),
    "length": ("len_mean", "len_max", "truncation_rate"),
}


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run directory?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: invalid JSON ({e.msg})") from None
    return records


def plot(run_dir: str | Path) -> list[Path]:
    """Writes one PNG per panel; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, keys in PANELS.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), label=key, marker="." if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(f"{Path(run_dir).name}: {name}")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m gtpo_jax.plot RUN_DIR", file=sys.stderr)
        return 2
    for path in plot(argv[1]):
        print(path)
    return 0


def _curves(records_by_seed: list[list[dict]], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """`(xs, ys [seeds, xs])` of metric `y` against `x`: each seed's points interpolated linearly
    onto the union of all seeds' x values, over the range every seed covers."""
    series = []
    for records in records_by_seed:
        points = sorted((r[x], r[y]) for r in records if r.get(y) is not None and r.get(x) is not None)
        if points:
            series.append(np.asarray(points, float).T)
    if len(series) < len(records_by_seed) or not series:
        return np.zeros(0), np.zeros((0, 0))
    low, high = max(s[0, 0] for s in series), min(s[0, -1] for s in series)
    xs = np.unique(np.concatenate([s[0] for s in series]))
    xs = xs[(xs >= low) & (xs <= high)]
    return xs, np.asarray([np.interp(xs, s[0], s[1]) for s in series])


def _grid_panel(ax, runs: dict[str, list[list[dict]]], x: str, y: str, label: str = "") -> None:
    """One line per variant (the mean over seeds) with a band from the lowest to the highest seed."""
    for variant, records_by_seed in runs.items():
        xs, ys = _curves(records_by_seed, x, y)
        if len(xs):
            line = ax.plot(xs, ys.mean(axis=0), label=f"{variant}{label}")[0]
            ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel(x.replace("_", " "))
    ax.grid(alpha=0.3)


def plot_grid(root: str | Path, results: list[dict]) -> list[Path]:
    """The comparison's figures under `root/plots` (see `gtpo_jax.compare`); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root, runs = Path(root), {}
    for r in results:  # each run's records, with its start evaluation at 0 sampled responses
        start = {"sampled_responses": 0.0, "step": 0, **{f"eval/{k}": v for k, v in r["start"].items()}}
        runs.setdefault(r["variant"], []).append([start, *read_metrics(root / r["variant"] / f"seed{r['seed']}")])
    k = next((key[4:] for key in results[0]["final"] if key.startswith("avg@")), "1") if results else "1"
    # One figure each, one panel per metric, one line per variant (mean over seeds, band over seeds).
    figures = {
        "accuracy": [
            ("sampled_responses", "eval/greedy_pass@1", "held-out greedy pass@1"),
            ("sampled_responses", f"eval/avg@{k}", f"held-out avg@{k} (temperature 1)"),
        ],
        "entropy": [("step", "entropy_pos", "entropy of O+ tokens"), ("step", "entropy_neg", "entropy of O- tokens")],
        "length": [("step", "len_mean", "mean response length (tokens)")],
        "signs": [
            ("step", "wrong_sign_pos", "wrong-sign fraction, O+"),
            ("step", "wrong_sign_neg", "wrong-sign fraction, O-"),
            ("step", "shaping_delta", "|A - A unshaped| (shaping is live)"),
        ],
    }
    out, written = root / "plots", []
    out.mkdir(parents=True, exist_ok=True)
    for name, panels in figures.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
        for ax, (x, y, title) in zip(axes[0], panels, strict=True):
            _grid_panel(ax, runs, x, y)
            ax.set_title(title, fontsize=10)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{root.name}: {name} (mean over seeds, band = lowest to highest seed)")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(out / f"{name}.png")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for variant in runs:
        curves = [
            {int(k[5:]): v for k, v in r["final"].items() if k.startswith("pass@")}
            for r in results
            if r["variant"] == variant
        ]
        ks = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(ks, [np.mean([c[k] for c in curves]) for k in ks], marker="o", label=variant)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    written.append(_save(fig, ax, out / "pass_at_k.png", f"{root.name}: pass@k at the end (mean over seeds)"))
    return written


def _save(fig, ax, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    ax.set_title(title)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main(sys.argv))
