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


if __name__ == "__main__":
    sys.exit(main(sys.argv))
