"""Collecting one rollout batch: sample, decode, reward, and DAPO dynamic sampling with refill.

Host-side glue around the jitted sampler (`rollout/sampler.py`) and the reward pool
(`rewards/pool.py`). With dynamic sampling, groups whose responses are all right or all wrong
(decided on the verifier's correctness, not on a shaped reward) are set aside and new prompts
are drawn, at most `max_refill_rounds` extra rounds; if the batch is still short, uninformative
groups fill it (the loss gives them zero weight) and the shortfall is logged and counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from gtpo_jax.data.tokenizer import Tokenizer
from gtpo_jax.rewards.pool import RewardPool
from gtpo_jax.rollout.sampler import FINISH_LENGTH, Sampler, pad_prompts


@dataclasses.dataclass
class GroupBatch:
    """P groups on the host (numpy), ready to be put on devices."""

    records: list[dict[str, Any]]
    prompt_ids: list[list[int]]
    tokens: np.ndarray  # [P, G, T]
    mask: np.ndarray  # [P, G, T] bool
    sampler_logp: np.ndarray  # [P, G, T]
    lengths: np.ndarray  # [P, G]
    truncated: np.ndarray  # [P, G] bool
    rewards: np.ndarray  # [P, G]
    completions: list[list[str]]

    def take(self, rows: Sequence[int]) -> GroupBatch:
        rows = list(rows)
        pick = lambda a: a[rows]  # noqa: E731
        return GroupBatch(
            [self.records[i] for i in rows], [self.prompt_ids[i] for i in rows], pick(self.tokens),
            pick(self.mask), pick(self.sampler_logp), pick(self.lengths), pick(self.truncated),
            pick(self.rewards), [self.completions[i] for i in rows],
        )  # fmt: skip

    @staticmethod
    def concat(parts: Sequence[GroupBatch]) -> GroupBatch:
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return GroupBatch(
            sum((p.records for p in parts), []), sum((p.prompt_ids for p in parts), []), cat("tokens"),
            cat("mask"), cat("sampler_logp"), cat("lengths"), cat("truncated"), cat("rewards"),
            sum((p.completions for p in parts), []),
        )  # fmt: skip

    def padded_prompts(self, buckets: Sequence[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        return pad_prompts(self.prompt_ids, buckets, pad_id)


def render_prompt(tok: Tokenizer, record: dict[str, Any], *, template: str, system_prompt: str, suffix: str) -> str:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": record["prompt"] + suffix}
    ]
    return tok.render_chat(messages, template=template)


def sample_groups(
    sampler: Sampler,
    model: Any,
    tok: Tokenizer,
    pool: RewardPool,
    records: list[dict[str, Any]],
    prompt_ids: list[list[int]],
    key: jax.Array,
) -> GroupBatch:
    """Draws G responses per prompt and scores them."""
    rollout, _, _ = sampler(model, prompt_ids, key)
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    P, G, _ = tokens.shape
    completions = [[tok.decode(tokens[p, g][mask[p, g]]) for g in range(G)] for p in range(P)]
    flat_records = [records[p] for p in range(P) for _ in range(G)]
    scores = pool.score(flat_records, [c for row in completions for c in row])
    rewards = np.asarray([s for s, _ in scores], np.float32).reshape(P, G)
    return GroupBatch(
        records, prompt_ids, tokens, mask, np.asarray(rollout.logp), np.asarray(rollout.lengths),
        np.asarray(rollout.finish_reason) == FINISH_LENGTH, rewards, completions,
    )  # fmt: skip


def collect(
    sampler: Sampler,
    model: Any,
    tok: Tokenizer,
    pool: RewardPool,
    batches: Iterator[list[dict[str, Any]]],
    encode: Any,
    key: jax.Array,
    *,
    num_prompts: int,
    dynamic_sampling: bool,
    max_refill_rounds: int,
    success_threshold: float,
) -> tuple[GroupBatch, dict[str, float]]:
    """One rollout batch of exactly `num_prompts` groups, and collection statistics."""
    kept: list[GroupBatch] = []
    spare: list[GroupBatch] = []
    have, rounds, sampled = 0, 0, 0
    for rounds in range(max_refill_rounds + 1 if dynamic_sampling else 1):
        records = next(batches)
        part = sample_groups(
            sampler, model, tok, pool, records, [encode(r) for r in records], jax.random.fold_in(key, rounds)
        )
        sampled += len(records)
        if not dynamic_sampling:
            kept.append(part)
            have = len(records)
            break
        correct = part.rewards > success_threshold
        informative = correct.any(axis=1) & ~correct.all(axis=1)
        kept.append(part.take(np.flatnonzero(informative)))
        spare.append(part.take(np.flatnonzero(~informative)))
        have += int(informative.sum())
        if have >= num_prompts:
            break
    batch = GroupBatch.concat(kept)
    informative_groups = min(have, num_prompts)
    if batch.tokens.shape[0] < num_prompts:
        short = num_prompts - batch.tokens.shape[0]
        logging.info("dynamic sampling: %d informative groups after %d rounds; %d filled with zero-weight groups",
                     batch.tokens.shape[0], rounds + 1, short)  # fmt: skip
        batch = GroupBatch.concat([batch, GroupBatch.concat(spare).take(range(short))])
    batch = batch.take(range(num_prompts))
    stats = {
        "sampling_rounds": float(rounds + 1),
        "prompts_sampled": float(sampled),
        "informative_groups": float(informative_groups),
    }
    return batch, stats
