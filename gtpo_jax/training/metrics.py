"""Metric writers: one JSONL record per step, TensorBoard scalars, a console progress line and,
with `metrics.wandb_project` set, Weights & Biases (the same scalars at their steps, the resolved
config, and the tables of sampled completions that also go to `run_dir/samples.jsonl`).

Only process 0 writes (multi-host runs call the writer on every process; the others no-op).
`wandb` is imported only when W&B is on.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax

from gtpo_jax.config import Config, MetricsSection, to_dict


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def wandb_settings(m: MetricsSection) -> dict[str, Any] | None:
    """`wandb.init`'s project, entity, name and mode; None when W&B is off (no project)."""
    settings = {"project": m.wandb_project, "entity": m.wandb_entity or None, "name": m.wandb_run_name or None}
    settings["mode"] = str(m.wandb_mode)
    return settings if settings["project"] else None


def _init_wandb(settings: dict[str, Any], config: dict[str, Any] | None, run_dir: Path) -> Any:
    import wandb  # lazily: a run without W&B never imports it

    return wandb.init(**settings, config=config, dir=str(run_dir))


def open_metrics(cfg: Config) -> MetricsWriter:
    """The run's writer: `train.run_dir`, and W&B as `cfg.metrics` says (with the resolved config)."""
    settings = wandb_settings(cfg.metrics)
    return MetricsWriter(
        cfg.train.run_dir,
        cfg.train.steps,
        wandb=settings,
        config=to_dict(cfg) if settings else None,
        budget=cfg.train.max_sampled_responses,
    )


class MetricsWriter:
    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        *,
        tensorboard: bool = True,
        stream=None,
        wandb: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        budget: int = 0,
    ):
        """`wandb`: `wandb.init` settings (`wandb_settings`; None = W&B off); `config`: the run's, for W&B.
        `budget`: `train.max_sampled_responses`; when set, the console's percentage and ETA follow
        the record's `sampled_responses` towards it (the run ends there, usually long before `steps`)."""
        self.enabled = jax.process_index() == 0
        self.budget = budget
        self.first_done: float | None = None
        self._decile = 0  # of the console's bar: a redrawn line is kept each time it passes a tenth
        self.wandb = None
        self.total = total_steps
        self.stream = stream or sys.stdout
        self.start = time.time()
        self.tb = None
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if not self.enabled:
            return
        if "://" in str(run_dir):  # checkpoints go to the bucket; appendable files stay on this host
            run_dir = Path.home() / "gtpo_jax_logs" / str(run_dir).rstrip("/").rsplit("/", 1)[-1]
            print(f"metrics: writing metrics.jsonl and TensorBoard events to {run_dir}", file=self.stream)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        if wandb:
            self.wandb = _init_wandb(wandb, config, run_dir)

    def rewind(self, step: int) -> None:
        """Drops the records after `step` from metrics.jsonl (a resume from step `step`'s
        checkpoint: the killed run may have logged steps past it, which the resume logs again; -1 =
        a fresh start, which keeps nothing of an earlier run in the same directory)."""
        if not self.enabled:
            return
        path = self.run_dir / "metrics.jsonl"
        self.jsonl.close()
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step] if step >= 0 else []
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.jsonl = open(path, "a", encoding="utf-8")
        if len(kept) < len(lines):
            self.message(
                f"metrics.jsonl: dropped {len(lines) - len(kept)} records after step {step} (logged again now)"
            )

    def write(self, step: int, record: dict[str, Any]) -> None:
        """Appends `{"step": step, **record}` (floats; non-finite values written as null)."""
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in record.items()}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if v is not None}, step=step)

    def samples(self, step: int, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
        """Sampled completions (`training/samples.py`): one `{"step": step, **row}` line each in
        `run_dir/samples.jsonl`, and with W&B on a `wandb.Table` logged as "samples" at `step`."""
        if not self.enabled:
            return
        with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"step": step, **row}) + "\n" for row in rows)
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=list(columns), data=[[row[c] for c in columns] for row in rows])
            self.wandb.log({"samples": table}, step=step)

    def progress(self, step: int, record: dict[str, Any], keys: tuple[str, ...]) -> None:
        """`[#####.....] step/total  pct  elapsed  eta  key value ...` on the console."""
        if not self.enabled:
            return
        by_budget = bool(self.budget) and "sampled_responses" in record
        # Progress in the unit that ends the run: sampled responses under a budget, else steps.
        done, total = (float(record["sampled_responses"]), self.budget) if by_budget else (step, self.total)
        if self.first_done is None:  # the rate is timed from the first line (compilation left out)
            self.first_done, self.start = done, time.time()
        elapsed = time.time() - self.start
        rate = (done - self.first_done) / max(elapsed, 1e-9)
        eta = _fmt_time((total - done) / rate) if rate > 0 else "?"
        width, frac = 20, min(done / max(total, 1), 1.0)
        filled = int(width * frac)
        values = "  ".join(f"{k} {record[k]:.3g}" for k in keys if k in record)
        count = f"{step} steps, {int(done)}/{total} responses" if by_budget else f"{step}/{self.total}"
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {count} {100 * frac:3.0f}%"
            f"  elapsed {_fmt_time(elapsed)}  eta {eta}  {values}"
        )
        if self._tty:  # one line redrawn in place; a newline every 10% keeps a trace in the scrollback
            keep, self._decile = int(10 * frac) != self._decile, int(10 * frac)
            print(f"\r\033[K{line}", end="\n" if keep else "", file=self.stream, flush=True)
        else:  # logs and pipes get one line per step
            print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\r\033[K" if self._tty else "") + text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


# jax's monitoring event for each XLA compilation (or persistent-cache load) of a jitted program.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA compilations while entered (`jax.monitoring`'s backend-compile event, with the
    compiled function's name). A run compiles most of its programs in its first step (and the
    warm-up and start evaluation before it); a later step may compile a program for the first time
    (the first periodic evaluation of a resumed run, the first samples table), or compile one again
    for a prompt or response length bucket seen for the first time. Any other recompilation (a
    shape that changes with dynamic sampling's refills, a host value traced as a constant) repeats
    step after step, silently slowing the run: `again` names them."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.last: list[str] = []  # the last `take`'s
        self._taken = 0

    def _listen(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == COMPILE_EVENT:
            self.names.append(str(kwargs.get("fun_name", "?")))

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)

    def take(self) -> list[str]:
        """The functions compiled since the last `take`."""
        self.last, self._taken = self.names[self._taken :], len(self.names)
        return self.last

    def again(self) -> list[str]:
        """The functions of the last `take` that were compiled before it too: recompilations."""
        before = set(self.names[: self._taken - len(self.last)])
        return sorted({name for name in self.last if name in before})
