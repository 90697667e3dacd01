"""Collecting one rollout batch: sample, decode, reward, and DAPO dynamic sampling with refill.

Host-side glue around the jitted sampler (`rollout/sampler.py`) and the reward pool
(`rewards/pool.py`). With dynamic sampling, groups whose responses are all right or all wrong
(decided on the verifier's correctness, not on a shaped reward) are set aside and new prompts
are drawn, at most `max_refill_rounds` extra rounds; if the batch is still short, uninformative
groups fill it (the loss gives them zero weight) and the shortfall is logged and counted.

Multi-process runs: every process holds the step's prompt records (text, small) and the same
padded prompt ids; the rollout itself (`tokens`, `mask`, `logp`: `[P, G, T]`) stays in global
device arrays split over the batch axes and is never gathered on a host. Each process decodes
and scores only the rows on its own devices (`score_rollout`); the `[P, G]` rewards, lengths and
finish flags are then shared with every process (a few bytes a response), so all processes take
the same dynamic-sampling decisions. One process or many, the step computes the same thing.

Reward health: each response carries a status (`rewards.registry.OK`, `ERROR`, `TIMEOUT`,
`CRASH`); only OK responses are *valid*. Dynamic sampling decides informativeness on the valid
responses, the loss leaves the others out (`losses.prepare_batch(valid=...)`), and the step's
error / timeout / crash rates over everything sampled are returned with the first error's text.

When the batch is short of informative groups, the zero-weight filler groups are spread over
the mini-batches (the informative ones dealt out in turn), so that no optimiser step is made
of filler alone while there are informative groups to share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from gtpo_jax.data.tokenizer import Tokenizer
from gtpo_jax.losses.groups import informative_from_sets
from gtpo_jax.models.sharding import rows_sharding
from gtpo_jax.rewards.pool import RewardPool
from gtpo_jax.rewards.registry import CRASH, ERROR, OK, TIMEOUT, reward_status
from gtpo_jax.rollout.sampler import FINISH_LENGTH, Rollout, Sampler, pad_prompts


@dataclasses.dataclass
class GroupBatch:
    """P groups: device arrays for the rollout, host arrays (the same on every process) for the rest."""

    records: list[dict[str, Any]]
    prompt_ids: list[list[int]]
    tokens: jax.Array  # [P, G, T] global
    mask: jax.Array  # [P, G, T] global
    sampler_logp: jax.Array  # [P, G, T] global
    lengths: np.ndarray  # [P, G]
    truncated: np.ndarray  # [P, G] bool
    rewards: np.ndarray  # [P, G]
    status: np.ndarray  # [P, G] int8: OK, ERROR, TIMEOUT or CRASH (rewards.registry)
    first_error: str = ""  # the first scoring error's text, for the log

    @property
    def valid(self) -> np.ndarray:
        """`[P, G]` bool: responses with a trustworthy reward."""
        return self.status == OK

    def padded_prompts(self, buckets: Sequence[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        return pad_prompts(self.prompt_ids, buckets, pad_id)


def render_prompt(tok: Tokenizer, record: dict[str, Any], *, template: str, system_prompt: str, suffix: str) -> str:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": record["prompt"] + suffix}
    ]
    return tok.render_chat(messages, template=template)


def to_rows(tree: Any) -> Any:
    """Mesh arrays laid out with their leading axis split over the batch axes (if it divides)."""

    def relayout(x: jax.Array) -> jax.Array:
        mesh = getattr(x.sharding, "mesh", None)
        return x if mesh is None else jax.device_put(x, rows_sharding(mesh, x.shape))

    return jax.tree.map(relayout, tree)


def local_rows(x: jax.Array) -> dict[int, np.ndarray]:
    """The rows (leading axis) this process holds, by global row index."""
    out: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0
        data = np.asarray(shard.data)
        for i in range(data.shape[0]):
            out.setdefault(start + i, data[i])
    return out


def allgather(x: np.ndarray) -> np.ndarray:
    """`[n_processes, ...]` of a host array (the array itself in a single-process run)."""
    if jax.process_count() == 1:
        return x[None]
    return np.asarray(multihost_utils.process_allgather(x))


def score_rollout(
    rollout: Rollout, records: Sequence[dict[str, Any]], tok: Tokenizer, pool: RewardPool
) -> tuple[np.ndarray, np.ndarray, str]:
    """`[P, G]` rewards and statuses on every process, and this process's first scoring error;
    each process scores only the groups on its devices (a group held by several processes is
    scored by the first of them)."""
    tokens, mask = local_rows(rollout.tokens), local_rows(rollout.mask)
    P, G = rollout.tokens.shape[:2]
    held = np.zeros(P, bool)
    held[list(tokens)] = True
    holders = allgather(held)
    mine = [p for p in range(P) if held[p] and not holders[: jax.process_index(), p].any()]
    completions = [tok.decode(tokens[p][g][mask[p][g]]) for p in mine for g in range(G)]
    scores = pool.score([records[p] for p in mine for _ in range(G)], completions)
    local = np.zeros((P, G), np.float32)
    status = np.zeros((P, G), np.int8)
    if mine:
        local[mine] = np.asarray([s for s, _ in scores], np.float32).reshape(len(mine), G)
        status[mine] = np.asarray([reward_status(info) for _, info in scores], np.int8).reshape(len(mine), G)
    first_error = next((str(info.get("error", "")) for _, info in scores if "error" in info), "")
    return allgather(local).sum(axis=0), allgather(status).sum(axis=0).astype(np.int8), first_error


def sample_groups(
    sampler: Sampler,
    model: Any,
    tok: Tokenizer,
    pool: RewardPool,
    records: list[dict[str, Any]],
    prompt_ids: list[list[int]],
    key: jax.Array,
    put: Callable[[np.ndarray], jax.Array],
) -> GroupBatch:
    """Draws G responses per prompt and scores them."""
    rollout, _, _ = sampler(model, prompt_ids, key, put=put)
    rollout = to_rows(rollout)
    small = multihost_utils.process_allgather((rollout.lengths, rollout.finish_reason), tiled=True)
    lengths, finish = (np.asarray(a) for a in small)
    rewards, status, first_error = score_rollout(rollout, records, tok, pool)
    return GroupBatch(records, prompt_ids, rollout.tokens, rollout.mask, rollout.logp, lengths,
                      finish == FINISH_LENGTH, rewards, status, first_error)  # fmt: skip


@jax.jit
def _take_rows(arrays: tuple[jax.Array, ...], rows: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.take(jnp.concatenate(parts), rows, axis=0) for parts in zip(*arrays, strict=True))


def select(parts: Sequence[GroupBatch], rows: Sequence[tuple[int, int]]) -> GroupBatch:
    """The groups `(part, row)` of `parts`, in that order; rollout rows move between devices only."""
    offsets = np.cumsum([0] + [len(p.records) for p in parts])
    flat = np.asarray([offsets[i] + r for i, r in rows], np.int32)
    device = _take_rows(tuple((p.tokens, p.mask, p.sampler_logp) for p in parts), flat)
    tokens, mask, logp = to_rows(device)
    pick = lambda name: np.concatenate([getattr(p, name) for p in parts])[flat]  # noqa: E731
    records = sum((p.records for p in parts), [])
    ids = sum((p.prompt_ids for p in parts), [])
    return GroupBatch([records[i] for i in flat], [ids[i] for i in flat], tokens, mask, logp,
                      pick("lengths"), pick("truncated"), pick("rewards"), pick("status"))  # fmt: skip


def spread_fillers(kept: list, fillers: list, num_prompts: int, mini_batches: int) -> list:
    """`num_prompts` rows, mini-batch after mini-batch: the kept (informative) rows dealt out in
    turn, then each mini-batch topped up with filler rows. With no filler the order is kept."""
    kept = kept[:num_prompts]
    fillers = fillers[: num_prompts - len(kept)]
    if not fillers or mini_batches <= 1:
        return kept + fillers
    size = num_prompts // mini_batches
    slots = [kept[i::mini_batches] for i in range(mini_batches)]
    rest = iter(fillers)
    return [row for slot in slots for row in slot + [next(rest) for _ in range(size - len(slot))]]


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
    put: Callable[[np.ndarray], jax.Array],
    mini_batches: int = 1,
    mask_truncated: bool = False,
) -> tuple[GroupBatch, dict[str, float]]:
    """One rollout batch of exactly `num_prompts` groups, and collection statistics.

    The statistics cover *everything sampled* this step (every refill round), before dynamic
    sampling keeps the informative groups: `sampled_pass_rate` and `sampled_reward` (valid
    responses), and `reward_error_rate`, `reward_timeout_rate`, `reward_crash_rate`,
    `reward_invalid_rate` (all responses). Under `mask_truncated` a truncated response does not
    count towards a group's informativeness (the loss leaves it out, `losses.prepare_batch`)."""
    parts: list[GroupBatch] = []
    kept: list[tuple[int, int]] = []
    spare: list[tuple[int, int]] = []
    rounds = sampled = 0
    for rounds in range(max_refill_rounds + 1 if dynamic_sampling else 1):
        records = next(batches)
        part = sample_groups(sampler, model, tok, pool, records, [encode(r) for r in records],
                             jax.random.fold_in(key, rounds), put)  # fmt: skip
        parts.append(part)
        sampled += len(records)
        # The loss's own rule (losses.groups), on the responses the loss will keep.
        valid = part.valid & ~part.truncated if mask_truncated else part.valid
        informative = np.asarray(informative_from_sets(part.rewards > success_threshold, valid))
        for row in range(len(records)):
            (kept if informative[row] or not dynamic_sampling else spare).append((rounds, row))
        if len(kept) >= num_prompts:
            break
    informative_groups = min(len(kept), num_prompts) if dynamic_sampling else num_prompts
    if len(kept) < num_prompts:
        logging.info("dynamic sampling: %d informative groups after %d rounds; %d filled with zero-weight groups",
                     len(kept), rounds + 1, num_prompts - len(kept))  # fmt: skip
    batch = select(parts, spread_fillers(kept, spare, num_prompts, mini_batches))
    status = np.concatenate([p.status for p in parts])
    rewards = np.concatenate([p.rewards for p in parts])
    ok = status == OK
    stats = {
        "sampling_rounds": float(rounds + 1),
        "prompts_sampled": float(sampled),
        "informative_groups": float(informative_groups),
        "sampled_pass_rate": float((rewards > success_threshold)[ok].mean()) if ok.any() else float("nan"),
        "sampled_reward": float(rewards[ok].mean()) if ok.any() else float("nan"),
        "reward_error_rate": float((status == ERROR).mean()),
        "reward_timeout_rate": float((status == TIMEOUT).mean()),
        "reward_crash_rate": float((status == CRASH).mean()),
        "reward_invalid_rate": float((~ok).mean()),
    }
    batch.first_error = next((p.first_error for p in parts if p.first_error), "")
    return batch, stats
