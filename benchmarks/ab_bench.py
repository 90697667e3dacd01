"""The same workload at two commits, side by side on one machine: is the current tree slower?

Checks out `--baseline` (a git revision) into a temporary worktree and runs each workload in
both trees, alternating (baseline, current, current, baseline, ... so drift in the machine's
load hits both sides alike), each run importing its own tree's `gtpo_jax` (`PYTHONPATH`). Prints
one JSON line per run and one summary line per workload: median wall seconds of each side, their
ratio, and the work each side did, checked equal (a workload whose two sides did different work
is reported `"same_work": false`, not as a ratio).

    python benchmarks/ab_bench.py --baseline=ce9dda5 --workloads=default_job,sampler --repeats=2

Workloads:
- `default_job`: `python -m gtpo_jax.train --config=configs/default.py` (the README's first
  command) into a temporary run directory; its work is the steps, the sampled responses and the
  response tokens (sum over steps of len_mean x responses) read back from `metrics.jsonl`.
- `sampler`: `benchmarks/sampler_bench.py --presets=tiny,smollm2_135m` (KV-cache decode tokens/s,
  JSON); its work is the rows, prompt length and decoded tokens of each preset.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _default_job(tree: Path, scratch: Path) -> tuple[list[str], Path]:
    run_dir = scratch / "run"
    cmd = [sys.executable, "-m", "gtpo_jax.train", "--config=configs/default.py", f"--config.train.run_dir={run_dir}"]
    return cmd, run_dir


def _default_job_work(run_dir: Path, stdout: str) -> dict:
    """The work (steps, sampled responses, response tokens) and the speed (wall) of the run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "len_mean" in r]
    responses = [r["sampled_responses"] for r in rows if "sampled_responses" in r]
    # len_mean is over the step's trained responses, prompts_sampled counts refills too: a tally
    # that is equal on both sides exactly when they drew the same batches.
    tally = sum(r["len_mean"] * r.get("prompts_sampled", 0.0) for r in steps)
    return {
        "work": {
            "steps": len(steps),
            "sampled_responses": max(responses, default=0.0),
            "length_tally": round(tally, 3),
        },
        "speed": {},
    }


def _sampler(tree: Path, scratch: Path) -> tuple[list[str], Path]:
    cmd = [sys.executable, str(tree / "benchmarks" / "sampler_bench.py"), "--presets=tiny,smollm2_135m", "--repeats=3"]
    return cmd, scratch


def _sampler_work(run_dir: Path, stdout: str) -> dict:
    """Per preset: rows, prompt length and decoded tokens (work) and KV-cache decode tok/s."""
    work, speed = {}, {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            work[row["preset"]] = {k: row[k] for k in ("P", "G", "prompt_len", "T", "decoded_tokens")}
            speed[row["preset"]] = row["kv_cache_tokens_per_s"]
    return {"work": work, "speed": speed}


# name -> (command in a tree, what the run did and how fast, what "better" means for the ratio)
WORKLOADS = {"default_job": (_default_job, _default_job_work), "sampler": (_sampler, _sampler_work)}


def run_once(name: str, side: str, tree: Path) -> dict:
    """One run of workload `name` in `tree`: wall seconds, the work it did, its speeds."""
    command, work_of = WORKLOADS[name]
    with tempfile.TemporaryDirectory() as scratch:
        cmd, run_dir = command(tree, Path(scratch))
        env = {**os.environ, "PYTHONPATH": str(tree)}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"{name} failed in {tree} (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        return {"workload": name, "side": side, "wall_s": round(wall, 2), **work_of(run_dir, proc.stdout)}


def summarise(name: str, rows: list[dict], baseline: str, current: str) -> dict:
    """Medians per side; ratios only when both sides did the same work."""
    sides = {s: [r for r in rows if r["side"] == s] for s in ("baseline", "current")}
    same = all(r["work"] == rows[0]["work"] for r in rows)
    out = {
        "workload": name,
        "baseline": baseline,
        "current": current,
        "runs_per_side": len(sides["current"]),
        "same_work": same,
        "work": rows[0]["work"] if same else {s: [r["work"] for r in v] for s, v in sides.items()},
    }
    wall = {s: statistics.median(r["wall_s"] for r in v) for s, v in sides.items()}
    out |= {"baseline_wall_s": wall["baseline"], "current_wall_s": wall["current"]}
    if same:
        out["current_wall_over_baseline"] = round(wall["current"] / wall["baseline"], 3)
        for key in rows[0]["speed"]:  # tok/s: higher is better
            med = {s: statistics.median(r["speed"][key] for r in v) for s, v in sides.items()}
            out[f"{key}_tokens_per_s"] = {s: round(m, 1) for s, m in med.items()}
            out[f"{key}_current_over_baseline"] = round(med["current"] / med["baseline"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git revision to compare against (e.g. a commit hash)")
    parser.add_argument("--workloads", default="default_job,sampler", help=f"comma-separated, of {sorted(WORKLOADS)}")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side and workload (alternating order)")
    args = parser.parse_args()
    names = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"--workloads: unknown {unknown}; choose from {sorted(WORKLOADS)}")
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
    rev, head, dirty = git("rev-parse", args.baseline), git("rev-parse", "HEAD"), git("status", "--porcelain")
    base_tree = Path(tempfile.mkdtemp(prefix="ab_baseline_"))
    git("worktree", "add", "--detach", str(base_tree), rev)
    try:
        for name in names:
            rows = []
            for i in range(args.repeats):
                order = [("baseline", base_tree), ("current", ROOT)]
                for side, tree in order if i % 2 == 0 else order[::-1]:
                    rows.append(run_once(name, side, tree))
                    print(json.dumps(rows[-1]), flush=True)
            print(json.dumps(summarise(name, rows, rev[:10], head[:10] + ("+dirty" if dirty else ""))), flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False)
        shutil.rmtree(base_tree, ignore_errors=True)


if __name__ == "__main__":
    main()
