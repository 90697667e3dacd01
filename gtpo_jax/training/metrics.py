"""Metric writers: one JSONL record per step, TensorBoard scalars, and a console progress line.

Only process 0 writes (multi-host runs call the writer on every process; the others no-op).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class MetricsWriter:
    def __init__(self, run_dir: str | Path, total_steps: int, *, tensorboard: bool = True, stream=None):
        self.enabled = jax.process_index() == 0
        self.total = total_steps
        self.stream = stream or sys.stdout
        self.start = time.time()
        self.first_step: int | None = None
        self.tb = None
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if not self.enabled:
            return
        if "://" in str(run_dir):  # checkpoints go to the bucket; appendable files stay on this host
            run_dir = Path.home() / "gtpo_jax_logs" / str(run_dir).rstrip("/").rsplit("/", 1)[-1]
            print(f"metrics: writing metrics.jsonl and TensorBoard events to {run_dir}", file=self.stream)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

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

    def progress(self, step: int, record: dict[str, Any], keys: tuple[str, ...]) -> None:
        """`[#####.....] step/total  pct  elapsed  eta  key value ...` on the console."""
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step, self.start = step - 1, time.time()
        done = step - self.first_step
        elapsed = time.time() - self.start
        eta = elapsed / max(done, 1) * (self.total - step)
        width = 20
        filled = int(width * step / max(self.total, 1))
        values = "  ".join(f"{k} {record[k]:.3g}" for k in keys if k in record)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} {100 * step / max(self.total, 1):3.0f}%"
            f"  elapsed {_fmt_time(elapsed)}  eta {_fmt_time(eta)}  {values}"
        )
        if self._tty:  # one line redrawn in place; a newline every 10% keeps a trace in the scrollback
            keep = step == self.total or step % max(self.total // 10, 1) == 0
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
