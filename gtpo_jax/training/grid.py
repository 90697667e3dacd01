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

from gtpo_jax.config import Config, from_dict, to_dict
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
    made_by = warmup_settings(cfg, warmup_steps)
    with ocp.StandardCheckpointer() as ckptr:
        if path.exists():
            check_saved(directory / "warmup_config.json", made_by, f"the saved warm-up {directory}", log)
            return ckptr.restore(path, abstract_params(run.model, run.mesh))
        params = initial_params(run)
        if warmup_steps:
            log(f"seed {cfg.train.seed}: warm-up (shared by the seed's variants)")
            with jax.set_mesh(run.mesh):  # as a run's own warm-up (`Trainer.run`)
                params = warm_up(run, params, load_data(cfg, run.encode)[0], steps=warmup_steps, log=log)
        directory.mkdir(parents=True, exist_ok=True)
        ckptr.save(path, params)
        ckptr.wait_until_finished()
        (directory / "warmup_config.json").write_text(json.dumps(made_by, indent=1))
        log(f"seed {cfg.train.seed}: starting parameters saved to {path}")
    return params


def warmup_settings(cfg: Config, steps: int) -> dict[str, Any]:
    """What a seed's warm-up depends on: its own section (with the grid's step count), the seed,
    the model, tokenizer and data."""
    d = to_dict(cfg)
    return {
        "warmup": {**d["warmup"], "steps": steps},
        "train": {"seed": d["train"]["seed"]},
        **{k: d[k] for k in ("model", "tokenizer", "data")},
    }


def differences(saved: dict[str, Any], now: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """`section.field: saved -> now` for each field of `now` whose value (as JSON) differs in
    `saved` (a field `saved` lacks counts as a difference), outside the sections or fields `skip`."""
    return [
        f"{s}.{k}: {saved.get(s, {}).get(k)!r} -> {v!r}"
        for s, vs in now.items()
        for k, v in vs.items()
        if s not in skip and f"{s}.{k}" not in skip and json.dumps(saved.get(s, {}).get(k)) != json.dumps(v)
    ]


def check_saved(path: Path, now: dict[str, Any], what: str, log: Callable[[str], None]) -> None:
    """Refuses to reuse `what` when the settings saved beside it (`path`) differ from `now`'s;
    one saved by a version that wrote no settings is adopted with a warning."""
    if not path.exists():
        log(f"warning: {what} has no {path.name} (an older version): reused as is, assuming this config made it")
        path.write_text(json.dumps(now, indent=1))
        return
    diffs = differences(json.loads(path.read_text()), now)
    if diffs:
        raise ConfigError(
            f"{what} was made with other settings ({'; '.join(diffs)}): delete it to run it again "
            "with this config, or restore the settings"
        )


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
        "config": to_dict(cfg),
    }
    (directory / "result.json").write_text(json.dumps(result, indent=1))
    return result


def run_grid(values: Mapping[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every cell not yet finished; returns `{"root", "results"}` (one record per cell)."""
    base = from_dict(values)  # the shared settings must be valid on their own
    if not base.train.max_sampled_responses:
        raise ConfigError("train.max_sampled_responses=0: a comparison needs a sampling budget, equal for every run")
    t = base.train
    per_round = t.prompts_per_step * base.loss.group_size
    if t.steps * per_round < t.max_sampled_responses:  # a run without refills would stop at the step limit
        raise ConfigError(
            f"train.steps={t.steps}: {t.steps} x {per_round} responses a step < train.max_sampled_responses="
            f"{t.max_sampled_responses}: GRPO-style runs would stop at the step limit, short of the budget"
        )
    budget = t.max_sampled_responses // per_round * per_round  # what every run samples: whole rounds
    root, compare = Path(base.train.run_dir), base.compare
    cells = [(seed, v) for seed in compare.seeds for v in compare.variants]
    configs = {cell: run_config(values, cell[1], cell[0]) for cell in cells}  # every variant checked up front
    results, times, t0 = [], [], time.time()
    for i, (seed, variant) in enumerate(cells):
        cfg = configs[(seed, variant)]
        done = Path(cfg.train.run_dir) / "result.json"
        if done.exists():
            result = json.loads(done.read_text())
            check_finished(result, cfg, done)
            results.append(result)
            log(f"[{i + 1}/{len(cells)}] {variant} seed {seed}: finished earlier, skipped")
            continue
        params = warm_start(cfg, base.warmup.steps, root / "warmup" / f"seed{seed}", log)
        start = time.time()
        result = run_cell(cfg, variant, params)
        if not result:
            log(f"[{i + 1}/{len(cells)}] {variant} seed {seed}: stopped; run the same command to resume")
            return {"root": str(root), "results": results, "stopped": True}
        if result["sampled_responses"] != budget:
            raise ConfigError(
                f"{variant} seed {seed} sampled {result['sampled_responses']} responses, not the budget's "
                f"{budget} ({cfg.train.run_dir}): the comparison would not be at equal budgets"
            )
        results.append(result)
        times.append(time.time() - start)
        eta = np.mean(times) * (len(cells) - i - 1)
        log(
            f"[{i + 1}/{len(cells)}] {variant} seed {seed}: {_brief(result)}; grid elapsed "
            f"{(time.time() - t0) / 60:.1f} min, eta {eta / 60:.1f} min"
        )
    return {"root": str(root), "results": results, "stopped": False}


# Fields a finished run's result does not depend on (where it logged, how it was split over devices).
_NOT_RESULTS = (
    "train.run_dir",
    "train.resume",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "reward.num_workers",
    "metrics",
    "compare",
    "mesh",
)


def check_finished(result: dict[str, Any], cfg: Config, path: Path) -> None:
    """Refuses to count a finished run made with other settings than this grid's cell."""
    if "config" not in result:
        raise ConfigError(f"{path} was written by an older version (no config): delete it to run the cell again")
    diffs = differences(result["config"], to_dict(cfg), skip=_NOT_RESULTS)
    if diffs:
        raise ConfigError(
            f"{path}: a finished run with other settings ({'; '.join(diffs)}): delete its directory "
            "to run it with this config"
        )


def _brief(result: dict[str, Any]) -> str:
    s, f = result["start"], result["final"]
    greedy = f"greedy {100 * s.get('greedy_pass@1', np.nan):.1f}% -> {100 * f.get('greedy_pass@1', np.nan):.1f}%"
    return f"{greedy}, {result['sampled_responses']} responses in {result['steps']} steps, {result['wall_s']:.0f} s"
