"""Scoring model output in a pool of worker processes with a hard time limit per item.

Model output is untrusted input: a verifier can hang on `9^{9^{9^9}}` or crash on a
pathological string. Each worker scores one item at a time over its own pipe, and every reply
carries the item's index, which the pool checks against what it sent that worker, so a score is
never attributed to the wrong item. A worker past `timeout_s` is killed and replaced and its item
scores the reward's failure score with `info["timeout"] = True`. A worker that dies for another
reason (killed from outside, out of memory) is replaced and its item retried `max_retries` times,
then scored as failed with `info["crashed"] = True`. Other items are never lost.

Workers are started with `spawn` (forking a process that runs JAX is unsafe).
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from gtpo_jax.rewards.registry import RewardSpec, call_reward, get_reward


def _worker(conn: Connection, spec: RewardSpec, options: Mapping[str, Any]) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, record, completion = message
        score, info = call_reward(spec, record, completion, options)
        conn.send((index, score, info))


class _Worker:
    def __init__(self, ctx, spec: RewardSpec, options: Mapping[str, Any]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, spec, dict(options)), daemon=True)
        self.process.start()
        child.close()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class RewardPool:
    """`pool.score(records, completions)` -> `[(score, info), ...]` in input order."""

    def __init__(
        self,
        reward: str | RewardSpec,
        *,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        max_retries: int = 1,
        options: Mapping[str, Any] | None = None,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}: must be >= 1")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0")
        self.spec = get_reward(reward) if isinstance(reward, str) else reward
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.options = dict(options or {})
        self._ctx = mp.get_context("spawn")
        self.workers = [self._start() for _ in range(num_workers)]
        self.timeouts = 0  # items killed for their time limit, over the pool's life
        self.restarts = 0  # workers replaced

    def _start(self) -> _Worker:
        return _Worker(self._ctx, self.spec, self.options)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        self.restarts += 1
        new = self._start()
        self.workers[self.workers.index(worker)] = new
        return new

    def score(self, records: Sequence[Mapping[str, Any]], completions: Sequence[str]) -> list[tuple[float, dict]]:
        if len(records) != len(completions):
            raise ValueError(f"{len(records)} records but {len(completions)} completions")
        results: list[tuple[float, dict] | None] = [None] * len(records)
        pending = collections.deque(range(len(records)))
        attempts: collections.Counter[int] = collections.Counter()
        idle = list(self.workers)
        busy: dict[_Worker, tuple[int, float]] = {}  # worker -> (item, deadline)
        failure = self.spec.failure_score

        while pending or busy:
            while pending and idle:
                worker, index = idle.pop(), pending.popleft()
                try:
                    worker.conn.send((index, records[index], completions[index]))
                except (BrokenPipeError, OSError):  # died while idle: replace, requeue
                    pending.appendleft(index)
                    idle.append(self._replace(worker))
                    continue
                busy[worker] = (index, time.monotonic() + self.timeout_s)
            deadline = min(d for _, d in busy.values())
            by_conn = {w.conn: w for w in busy}
            for conn in wait(list(by_conn), timeout=max(0.0, deadline - time.monotonic())):
                worker = by_conn[conn]
                index, _ = busy.pop(worker)
                try:
                    got, score, info = conn.recv()
                except (EOFError, OSError):  # the worker died mid-item
                    attempts[index] += 1
                    if attempts[index] <= self.max_retries:
                        pending.appendleft(index)
                    else:
                        results[index] = (failure, {"crashed": True})
                    idle.append(self._replace(worker))
                    continue
                if got != index:
                    raise RuntimeError(f"reward worker answered item {got} while scoring item {index}")
                results[index] = (score, info)
                idle.append(worker)
            now = time.monotonic()
            for worker, (index, item_deadline) in list(busy.items()):
                if now >= item_deadline:
                    del busy[worker]
                    results[index] = (failure, {"timeout": True})
                    self.timeouts += 1
                    idle.append(self._replace(worker))
        return [r for r in results if r is not None]

    def close(self) -> None:
        for worker in self.workers:
            try:
                worker.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            worker.process.join(timeout=2)
            worker.kill()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
