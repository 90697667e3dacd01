"""The runs of a comparison grid (`python -m gtpo_jax.compare`): variants x seeds, each seed's
variants starting from one shared warm-up, each run stopped at the same sampling budget.

- `parse_variant("gtpo_joint:gtpo:gtpo_norm=joint")` -> `("gtpo_joint", "gtpo", {"gtpo_norm": "joint"})`.
- `run_config(values, variant, seed)`: the run config of one cell, from the user's config values:
  the variant's loss settings, the seed for initialisation, data order and sampling, the run's
  own directory, and no warm-up (it comes from `warm_start`).
- `warm_start(cfg, directory)`: the seed's warm-up parameters, trained once (under the run's
  mesh, as `Trainer.run` trains) and saved (orbax), then read back by every variant of the seed.
- `run_cell(cfg, params, log)`: one RL run, resumable; writes `result.json` when it finishes, and
  a finished run is never run again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gtpo_jax.config import Config, from_dict
from gtpo_jax.errors import ConfigError
from gtpo_jax.training.build import build, initial_params, load_data
from gtpo_jax.training.checkpoint import abstract_params
from gtpo_jax.training.loop import Trainer
from gtpo_jax.training.warmup import warm_up


def _value(text: str) -> Any:
    """A loss field's value as written in a variant: bool, int, float, else the string."""
    if text in ("True", "False", "true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_variant(spec: str) -> tuple[str, str, dict[str, Any]]:
    """`name` or `name:algorithm:field=value,...` -> `(name, algorithm, loss overrides)`."""
    parts = spec.split(":")
    if len(parts) == 1:
        return spec, spec, {}
    if len(parts) != 3 or not parts[1]:
        raise ConfigError(f"compare.variants: {spec!r}: expected 'name' or 'name:algorithm:field=value,...'")
    fields = {}
    for item in filter(None, parts[2].split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"compare.variants: {spec!r}: {item!r} is not field=value")
        fields[key.strip()] = _value(value.strip())
    return parts[0], parts[1], fields


def run_config(values: Mapping[str, Any], variant: str, seed: int) -> Config:
    """The config of one cell of the grid (see the module docstring); errors name the variant."""
    name, algorithm, fields = parse_variant(variant)
    root = Path(values.get("train", {}).get("run_dir", "runs/compare"))
    cell = {k: dict(v) for k, v in values.items()}
    cell["loss"] = {**cell.get("loss", {}), "algorithm": algorithm, **fields}
    cell["train"] = {**cell.get("train", {}), "seed": seed, "run_dir": str(root / name / f"seed{seed}")}
    cell["model"] = {**cell.get("model", {}), "init_seed": seed}
    cell["data"] = {**cell.get("data", {}), "seed": seed}
    cell["warmup"] = {**cell.get("warmup", {}), "steps": 0}
    try:
        return from_dict(cell)
    except ConfigError as e:
        raise ConfigError(f"compare.variants: {variant!r}: {e}") from None


def warm_start(cfg: Config, warmup_steps: int, directory: Path, log: Callable[[str], None]) -> Any:
    """The seed's starting parameters on `cfg`'s mesh: the saved warm-up, or trained now and saved
    (`warmup_steps` supervised steps; 0 = the initialisation itself)."""
    run = build(cfg, train=False)
    path = (directory / "params").absolute()
    with ocp.StandardCheckpointer() as ckptr:
        if path.exists():
            return ckptr.restore(path, abstract_params(run.model, run.mesh))
        params = initial_params(run)
        if warmup_steps:
            log(f"seed {cfg.train.seed}: warm-up (shared by the seed's variants)")
            with jax.set_mesh(run.mesh):  # as a run's own warm-up (`Trainer.run`)
                params = warm_up(run, params, load_data(cfg, run.encode)[0], steps=warmup_steps, log=log)
        directory.mkdir(parents=True, exist_ok=True)
        ckptr.save(path, params)
        ckptr.wait_until_finished()
        log(f"seed {cfg.train.seed}: starting parameters saved to {path}")
    return params


def mean_response_tokens(run_dir: Path) -> float:
    """Mean of the per-step mean response length over a run's metrics."""
    lengths = [r["len_mean"] for r in _records(run_dir) if r.get("len_mean") is not None]
    return float(np.mean(lengths)) if lengths else float("nan")


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_cell(cfg: Config, variant: str, params: Any) -> dict[str, Any]:
    """One RL run of the grid (resumed if interrupted); its `result.json` record."""
    directory = Path(cfg.train.run_dir)
    wall_file = directory / "wall_s.json"
    spent = json.loads(wall_file.read_text())["wall_s"] if wall_file.exists() else 0.0
    t0, trainer = time.time(), Trainer(cfg, params=params)
    try:
        out = trainer.run()
    finally:
        trainer.close()
        directory.mkdir(parents=True, exist_ok=True)
        wall_file.write_text(json.dumps({"wall_s": spent + time.time() - t0}))
    if "final_eval" not in out:  # stopped (SIGTERM, stop_after): the same command resumes it
        return {}
    result = {
        "variant": parse_variant(variant)[0],
        "algorithm": cfg.loss.algorithm,
        "seed": cfg.train.seed,
        "sampled_responses": out["sampled_responses"],
        "steps": out["steps"],
        "wall_s": spent + time.time() - t0,
        "mean_response_tokens": mean_response_tokens(directory),
        "start": out["start_eval"],
        "final": out["final_eval"],
    }
    (directory / "result.json").write_text(json.dumps(result, indent=1))
    return result


def run_grid(values: Mapping[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every cell not yet finished; returns `{"root", "results"}` (one record per cell)."""
    base = from_dict(values)  # the shared settings must be valid on their own
    if not base.train.max_sampled_responses:
        raise ConfigError("train.max_sampled_responses=0: a comparison needs a sampling budget, equal for every run")
    root, compare = Path(base.train.run_dir), base.compare
    cells = [(seed, v) for seed in compare.seeds for v in compare.variants]
    configs = {cell: run_config(values, cell[1], cell[0]) for cell in cells}  # every variant checked up front
    results, times, t0 = [], [], time.time()
    for i, (seed, variant) in enumerate(cells):
        cfg = configs[(seed, variant)]
        done = Path(cfg.train.run_dir) / "result.json"
        if done.exists():
            results.append(json.loads(done.read_text()))
            log(f"[{i + 1}/{len(cells)}] {variant} seed {seed}: finished earlier, skipped")
            continue
        params = warm_start(cfg, base.warmup.steps, root / "warmup" / f"seed{seed}", log)
        start = time.time()
        result = run_cell(cfg, variant, params)
        if not result:
            log(f"[{i + 1}/{len(cells)}] {variant} seed {seed}: stopped; run the same command to resume")
            return {"root": str(root), "results": results, "stopped": True}
        results.append(result)
        times.append(time.time() - start)
        eta = np.mean(times) * (len(cells) - i - 1)
        log(
            f"[{i + 1}/{len(cells)}] {variant} seed {seed}: {_brief(result)}; grid elapsed "
            f"{(time.time() - t0) / 60:.1f} min, eta {eta / 60:.1f} min"
        )
    return {"root": str(root), "results": results, "stopped": False}


def _brief(result: dict[str, Any]) -> str:
    s, f = result["start"], result["final"]
    greedy = f"greedy {100 * s.get('greedy_pass@1', np.nan):.1f}% -> {100 * f.get('greedy_pass@1', np.nan):.1f}%"
    return f"{greedy}, {result['sampled_responses']} responses in {result['steps']} steps, {result['wall_s']:.0f} s"
