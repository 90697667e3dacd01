"""The prompt pipeline: filter, per-host shard, seeded shuffle, epochs, batches, resumable state.

Built on grain's `MapDataset` (random access, so a position is just an index):

    records --filter(too long)--> [process_index::process_count] --shuffle(seed)--> repeat(epochs)
            --> batch(prompts_per_host)

- **Filtering** of prompts longer than `max_prompt_tokens` happens once, eagerly, before
  sharding, so every host agrees on the dataset; the number dropped (and a few ids) is logged
  and kept in `stats`, never silent.
- **Sharding**: each host reads only its own slice (record `i` goes to host `i % count`), so
  slices are disjoint and together cover the filtered dataset.
- **Shuffling** is a seeded permutation per epoch (grain reshuffles each epoch).
- **State**: `get_state()` is a small JSON-able dict (`{"next_index": k}` plus the settings it is
  valid for); `set_state` on a pipeline built the same way continues at exactly the next batch,
  in this process or another. The trainer stores it in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
from absl import logging


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How prompt batches are drawn."""

    # Prompts per batch on this host (P / process_count in a multi-host run).
    batch_size: int = 8
    # Seed of the shuffle; the same seed and data give the same batches.
    seed: int = 0
    # Shuffle the records (each epoch anew).
    shuffle: bool = True
    # Passes over the data; 0 = repeat forever.
    num_epochs: int = 0
    # Prompts with more tokens than this are dropped (counted and logged); 0 = no limit.
    max_prompt_tokens: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"PipelineConfig.batch_size={self.batch_size}: must be >= 1")
        if self.num_epochs < 0:
            raise ValueError(f"PipelineConfig.num_epochs={self.num_epochs}: must be >= 0 (0 = forever)")
        if self.max_prompt_tokens < 0:
            raise ValueError(f"PipelineConfig.max_prompt_tokens={self.max_prompt_tokens}: must be >= 0 (0 = no limit)")


class PromptPipeline:
    """An iterator of prompt batches (lists of records) with a checkpointable position."""

    def __init__(
        self,
        records: Sequence[dict[str, Any]],
        cfg: PipelineConfig,
        *,
        prompt_tokens: Callable[[dict[str, Any]], int] | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
        self.cfg = cfg
        kept, dropped = list(records), []
        if cfg.max_prompt_tokens and prompt_tokens is not None:
            kept, dropped = [], []
            for r in records:
                (kept if prompt_tokens(r) <= cfg.max_prompt_tokens else dropped).append(r)
        if dropped:
            logging.warning(
                "data: dropped %d of %d prompts longer than max_prompt_tokens=%d (first ids: %s)",
                len(dropped),
                len(records),
                cfg.max_prompt_tokens,
                [r["id"] for r in dropped[:5]],
            )
        self.stats = {"records": len(records), "dropped_too_long": len(dropped), "kept": len(kept)}
        shard = grain.MapDataset.source(kept)[process_index::process_count]
        self.shard_size = len(shard)
        if self.shard_size < cfg.batch_size:
            raise ValueError(
                f"host {process_index} of {process_count} holds {self.shard_size} prompts, fewer than one batch "
                f"of {cfg.batch_size}; {len(kept)} prompts remain after filtering"
            )
        dataset = shard.seed(cfg.seed)
        if cfg.shuffle:
            dataset = dataset.shuffle()
        dataset = dataset.repeat(cfg.num_epochs or None).batch(cfg.batch_size, drop_remainder=True, batch_fn=list)
        self._dataset = dataset
        self._iter = iter(dataset)
        self._settings = {
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "shuffle": cfg.shuffle,
            "process_index": process_index,
            "process_count": process_count,
            "kept": len(kept),
        }

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        return next(self._iter)

    @property
    def batches_per_epoch(self) -> int:
        return self.shard_size // self.cfg.batch_size

    def get_state(self) -> dict[str, Any]:
        """JSON-able position: restoring it continues at exactly the next batch."""
        return {"grain": self._iter.get_state(), **self._settings}

    def set_state(self, state: dict[str, Any]) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._settings.items() if state.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"data iterator state was saved for another pipeline ({detail})")
        self._iter.set_state(state["grain"])

    @property
    def epoch(self) -> int:
        """Epochs completed on this host."""
        return int(self._iter.get_state()["next_index"]) * self.cfg.batch_size // max(self.shard_size, 1)
