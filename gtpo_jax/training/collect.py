"""Collecting one rollout batch: sample, decode, reward, and DAPO dynamic sampling with refill.

Host-side glue around the jitted sampler (`rollout/sampler.py`) and the reward pool
(`rewards/pool.py`). With dynamic sampling, groups whose responses are all right or all wrong
(decided on the verifier's correctness, not on a shaped reward) are set aside and new prompts
are drawn, at most `rollout.max_refill_rounds` extra rounds; if the batch is still short,
uninformative groups fill it (the loss gives them zero weight) and the shortfall is logged and
counted.

What crosses between host and devices: a sampling round's prompts are padded and placed once
(`draw`); the sampler and later the scoring pass use those arrays. The rollout (`tokens`, `mask`,
`logp`: `[P, G, T]`) stays in global device arrays split over the batch axes: each process
decodes and scores only the rows on its own devices (`score_rollout`), and the `[P, G]`
lengths and finish flags are read back (a few bytes a response) for the dynamic-sampling
decisions, which every process then takes identically. Correctness (`O+`) and informativeness
are decided here, once, and handed to the loss (`losses.prepare_batch(correct=, informative=)`).

Reward health: each response carries a status (`rewards.registry.OK`, `ERROR`, `TIMEOUT`,
`CRASH`); only OK responses are *valid*. Dynamic sampling decides informativeness on the valid
responses, the loss leaves the others out, and the step's error / timeout / crash rates over
everything sampled are returned with the first error's text.

When the batch is short of informative groups, the zero-weight filler groups are spread over
the mini-batches (the informative ones dealt out in turn), so that no optimiser step is made
of filler alone while there are informative groups to share.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gtpo_jax.config import RewardSection
from gtpo_jax.data.prompts import bucket_length, pad_prompts
from gtpo_jax.data.tokenizer import Tokenizer
from gtpo_jax.models.sharding import rows_sharding
from gtpo_jax.parallel.placement import allgather, gather_rows, local_rows
from gtpo_jax.rewards.pool import RewardPool
from gtpo_jax.rewards.registry import CRASH, ERROR, OK, TIMEOUT, reward_status
from gtpo_jax.rollout.sampler import FINISH_LENGTH, Rollout, SamplingConfig, sample
from gtpo_jax.training.build import Run


@dataclasses.dataclass
class GroupBatch:
    """P groups: device arrays for the prompts and the rollout, host arrays (the same on every
    process) for the verdicts."""

    records: list[dict[str, Any]]
    prompts: jax.Array  # [P, Lp] int32 global, left-padded
    prompt_valid: jax.Array  # [P, Lp] bool global
    rollout: Rollout  # [P, G, T] / [P, G] global
    lengths: np.ndarray  # [P, G]
    truncated: np.ndarray  # [P, G] bool
    rewards: np.ndarray  # [P, G]
    status: np.ndarray  # [P, G] int8: OK, ERROR, TIMEOUT or CRASH (rewards.registry)
    prompt_lengths: np.ndarray  # [P] int: real (unpadded) prompt tokens
    first_error: str = ""  # the first scoring error's text, for the log

    @property
    def valid(self) -> np.ndarray:
        """`[P, G]` bool: responses with a trustworthy reward."""
        return self.status == OK


class RewardHealthError(RuntimeError):
    """Too many responses of a step have no valid reward: the verifier, not the policy, is failing."""


def check_reward_health(stats: dict[str, float], first_error: str, r: RewardSection, step: int) -> None:
    """Logs invalid rewards; raises `RewardHealthError` when more than `reward.max_invalid_frac`
    of the step's sampled responses are invalid (nothing of the step is trained on)."""
    rate = stats["reward_invalid_rate"]
    if rate == 0:
        return
    what = (
        f"{100 * rate:.1f}% of the step's sampled responses have no valid reward (errors "
        f"{100 * stats['reward_error_rate']:.1f}%, timeouts {100 * stats['reward_timeout_rate']:.1f}% at "
        f"reward.timeout_s={r.timeout_s}, crashes {100 * stats['reward_crash_rate']:.1f}%)"
    )
    error = f"; first error: {first_error}" if first_error else ""
    if rate > r.max_invalid_frac:
        raise RewardHealthError(
            f"step {step}: {what}, more than reward.max_invalid_frac={r.max_invalid_frac}. The verifier "
            f"(reward.name={r.name!r}) is failing, not the policy; nothing of this step was trained on{error}"
        )
    logging.warning("reward: %s; they are left out of the loss%s", what, error)


@dataclasses.dataclass(frozen=True)
class Verdicts:
    """What the verifier decided about a batch, on the host: the loss's inputs besides the tokens."""

    rewards: np.ndarray  # [P, G] float32
    valid: np.ndarray  # [P, G] bool: a trustworthy reward
    correct: np.ndarray  # [P, G] bool: in O+ (reward above the success threshold, among the kept responses)
    informative: np.ndarray  # [P] bool: both O+ and O- among the responses the loss keeps

    def as_tuple(self) -> tuple[np.ndarray, ...]:
        return self.rewards, self.valid, self.correct, self.informative


def verdicts(batch: GroupBatch, *, success_threshold: float, mask_truncated: bool) -> Verdicts:
    """Correctness and informativeness, by the loss's own rule (`losses.groups`), on the responses
    the loss keeps (under `mask_truncated`, truncated responses do not count)."""
    kept = batch.valid & ~batch.truncated if mask_truncated else batch.valid
    correct = (batch.rewards > success_threshold) & kept
    # `losses.groups.informative_from_sets` on the host (numpy: no device round trip), tested equal.
    informative = (correct & kept).any(axis=-1) & (~correct & kept).any(axis=-1)
    return Verdicts(batch.rewards.astype(np.float32), batch.valid, correct, informative)


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


def draw(
    run: Run,
    params: Any,
    pool: RewardPool,
    records: list[dict[str, Any]],
    key: jax.Array,
    sampling: SamplingConfig | None = None,
) -> GroupBatch:
    """Pads and places the records' prompts once, draws G responses for each (in sampler calls
    of `rollout.batch_size` sequences: `sample_chunks`), and scores them."""
    ids = [run.encode(r) for r in records]
    tokens, valid = pad_prompts(ids, run.cfg.rollout.prompt_buckets, run.tok.pad_id)
    sampling = sampling or run.sampling
    prompts, prompt_valid = run.place.put((tokens, valid))
    rollout = run.place.as_rows(sample_chunks(run, params, (tokens, valid), (prompts, prompt_valid), key, sampling))
    lengths, finish = gather_rows((rollout.lengths, rollout.finish_reason))
    rewards, status, first_error = score_rollout(rollout, records, run.tok, pool)
    truncated, prompt_lengths = finish == FINISH_LENGTH, np.asarray([len(i) for i in ids])
    return GroupBatch(
        records, prompts, prompt_valid, rollout, lengths, truncated, rewards, status, prompt_lengths, first_error
    )


def chunk_prompts(num_prompts: int, group_size: int, batch_size: int) -> int:
    """Prompts per sampler call: `batch_size // group_size` (at least 1), or all of them when
    `batch_size` is 0 or holds every prompt's samples."""
    return num_prompts if not batch_size else max(1, min(num_prompts, batch_size // group_size))


@functools.partial(jax.jit, static_argnames="rows")
def _join(parts: list[Rollout], rows: int) -> Rollout:
    """The chunks' rollouts end to end, without the padding rows of the last chunk."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs)[:rows], *parts)


def sample_chunks(
    run: Run, params: Any, host: tuple[np.ndarray, np.ndarray], placed: tuple, key: jax.Array, sampling: SamplingConfig
) -> Rollout:
    """The rollout of the padded prompts (`host`, and `placed` on the mesh), drawn in calls of
    `chunk_prompts` prompts (`rollout.batch_size` sequences), concatenated on the devices. Each
    call takes its rows' keys from the whole draw's (`sampler.row_keys`): the same tokens as one
    call. A short last chunk is padded with copies of the last prompt (one compiled shape)."""
    tokens, valid = host
    P, G = len(tokens), sampling.group_size
    chunk = chunk_prompts(P, G, run.cfg.rollout.batch_size)
    if chunk == P:
        run.note_sampler_shape(tokens.shape, sampling)
        return sample(run.model, params, *placed, key, sampling)
    run.note_sampler_shape((chunk, tokens.shape[1]), sampling, total_rows=P * G)
    n = -(-P // chunk)
    last = np.full(n * chunk - P, P - 1)
    tokens, valid = (np.concatenate([x, x[last]]) for x in (tokens, valid))
    parts = []
    for i in range(n):
        rows = slice(i * chunk, (i + 1) * chunk)
        prompts, prompt_valid = run.place.put((tokens[rows], valid[rows]))
        offset = jnp.int32(i * chunk * G)
        parts.append(sample(run.model, params, prompts, prompt_valid, key, sampling, offset, total_rows=P * G))
    return _join(parts, P)


def _fit(x: jax.Array, width: int, fill: Any) -> jax.Array:
    """Left-pads (or left-crops) `[P, Lp]` prompt arrays to `width` columns."""
    if x.shape[1] >= width:
        return x[:, x.shape[1] - width :]
    return jnp.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=fill)


@functools.partial(jax.jit, static_argnames=("width", "pad_id", "mesh"), donate_argnums=0)
def _merge_rows(acc: tuple, part: tuple, rows: jax.Array, mine: jax.Array, width: int, pad_id: int, mesh: Any) -> tuple:
    """`acc` (`(prompts, prompt_valid, rollout)` of the selected groups) with the slots where
    `mine` taken from rows `rows` of one sampling round's `part`; prompts brought to `width`.
    One program for every round and every number of rounds: dynamic sampling's refills compile
    nothing new (a concatenation of the rounds compiled once per round count). The result stays
    split by rows over `mesh`'s batch axes, not whole on every device."""
    prompts, valid, rollout = part
    taken = (_fit(prompts, width, pad_id), _fit(valid, width, False), rollout)
    taken = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), taken)
    merged = jax.tree.map(lambda a, t: jnp.where(mine.reshape(-1, *[1] * (t.ndim - 1)), t, a), acc, taken)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rows_sharding(mesh, x.shape)), merged)


def select(run: Run, parts: Sequence[GroupBatch], rows: Sequence[tuple[int, int]]) -> GroupBatch:
    """The groups `(part, row)` of `parts`, in that order; device rows move between devices only.
    Prompts are brought to the bucket of the longest selected prompt (as if padded together)."""
    offsets = np.cumsum([0] + [len(p.records) for p in parts])
    flat = np.asarray([offsets[i] + r for i, r in rows], np.int32)
    pick = lambda name: np.concatenate([getattr(p, name) for p in parts])[flat]  # noqa: E731
    width = bucket_length(int(pick("prompt_lengths").max()), run.cfg.rollout.prompt_buckets)
    part_of, row_of = (np.asarray(x, np.int32) for x in zip(*rows, strict=True))
    first, mesh = parts[0], run.place.mesh
    zeros = lambda shape, dtype: jnp.zeros(shape, dtype, device=rows_sharding(mesh, shape))  # noqa: E731
    acc = (
        zeros((len(rows), width), first.prompts.dtype),
        zeros((len(rows), width), first.prompt_valid.dtype),
        jax.tree.map(lambda x: zeros((len(rows), *x.shape[1:]), x.dtype), first.rollout),
    )
    for i, p in enumerate(parts):
        mine = part_of == i
        if mine.any():
            local = jnp.asarray(np.where(mine, row_of, 0))
            part = (p.prompts, p.prompt_valid, p.rollout)
            acc = _merge_rows(acc, part, local, jnp.asarray(mine), width, run.tok.pad_id, mesh)
    prompts, valid, rollout = run.place.as_rows(acc)
    records = sum((p.records for p in parts), [])
    return GroupBatch(
        [records[i] for i in flat],
        prompts,
        valid,
        rollout,
        pick("lengths"),
        pick("truncated"),
        pick("rewards"),
        pick("status"),
        pick("prompt_lengths"),
    )


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


def sampling_stats(parts: Sequence[GroupBatch], success_threshold: float) -> dict[str, float]:
    """Pass rate, reward and reward-failure rates over *everything sampled* (every refill round)."""
    status = np.concatenate([p.status for p in parts])
    rewards = np.concatenate([p.rewards for p in parts])
    ok = status == OK
    return {
        "sampled_pass_rate": float((rewards > success_threshold)[ok].mean()) if ok.any() else float("nan"),
        "sampled_reward": float(rewards[ok].mean()) if ok.any() else float("nan"),
        "reward_error_rate": float((status == ERROR).mean()),
        "reward_timeout_rate": float((status == TIMEOUT).mean()),
        "reward_crash_rate": float((status == CRASH).mean()),
        "reward_invalid_rate": float((~ok).mean()),
    }


def collect(
    run: Run,
    params: Any,
    pool: RewardPool,
    batches: Iterator[list[dict[str, Any]]],
    key: jax.Array,
    max_rounds: int | None = None,
) -> tuple[GroupBatch, Verdicts, dict[str, float]]:
    """One rollout batch of exactly `train.prompts_per_step` groups, its verdicts, and collection
    statistics (`sampling_stats`, plus the rounds, prompts sampled and informative groups).
    `max_rounds` caps the sampling rounds (the rest of a sampling budget), refills included."""
    cfg = run.cfg
    limit = cfg.rollout.max_refill_rounds + 1 if cfg.loss.dynamic_sampling else 1
    limit = limit if max_rounds is None else max(1, min(limit, max_rounds))
    num_prompts, dynamic = cfg.train.prompts_per_step, bool(cfg.loss.dynamic_sampling)
    rule = dict(success_threshold=cfg.loss.success_threshold, mask_truncated=bool(cfg.loss.mask_truncated))
    parts: list[GroupBatch] = []
    kept: list[tuple[int, int]] = []
    spare: list[tuple[int, int]] = []
    rounds = sampled = 0
    for rounds in range(limit):
        part = draw(run, params, pool, next(batches), jax.random.fold_in(key, rounds))
        parts.append(part)
        sampled += len(part.records)
        informative = verdicts(part, **rule).informative
        for row in range(len(part.records)):
            (kept if informative[row] or not dynamic else spare).append((rounds, row))
        if len(kept) >= num_prompts:
            break
    if dynamic and len(kept) < num_prompts:
        logging.warning(
            "dynamic sampling: %d informative groups after %d rounds; %d filled with zero-weight groups",
            len(kept),
            rounds + 1,
            num_prompts - len(kept),
        )
    batch = select(run, parts, spread_fillers(kept, spare, num_prompts, cfg.train.mini_batches))
    batch.first_error = next((p.first_error for p in parts if p.first_error), "")
    final = verdicts(batch, **rule)
    stats = {
        "sampling_rounds": float(rounds + 1),
        "prompts_sampled": float(sampled),
        "informative_groups": float(final.informative.sum()),  # with or without dynamic sampling
        **sampling_stats(parts, cfg.loss.success_threshold),
    }
    return batch, final, stats
