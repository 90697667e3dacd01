"""The jitted pieces of one RL step: the scoring pass, loss preparation, and the policy update.

Shapes: `P` prompts of the (mini-)batch, `Lp` padded prompt length, `G` responses per prompt,
`T` response length. Mini-batches slice `P` (whole groups: `prepare` forms every group statistic
on the whole rollout batch before any split).

A micro-batch holds `train.micro_batch_size` sequences (0 = a whole mini-batch's), the same in
the scoring pass (over the rollout batch) and in the update (over one mini-batch): both flatten
`[P, G]` into `P * G` sequence rows, each with its own copy of its prompt, and cut the rows into
consecutive micro-batches with `micro_split`, so a group may straddle two micro-batches. A
micro-batch's rows are split over the mesh's batch axes; when its size is not a multiple of
their width it is padded with masked rows (repeats of real rows, loss mask 0), which costs
compute and is logged once when the step is built (`step_fns`). The update accumulates over
the micro-batches with `lax.scan`: each contributes the gradient of its loss *sum* and its
*denominator*; the gradient of the mini-batch loss is `sum(grad loss_sum) / sum(denominator)`
— exactly the gradient of `sum / sum` because the denominator does not depend on the
parameters (a token-mean divides by the mini-batch's token count, not a micro-batch's; every
other aggregation is per sequence, and a sequence never straddles micro-batches). A gradient
(or loss) that is not finite skips the update: parameters and optimiser state are kept, and `skipped` is incremented. A
mini-batch with no loss tokens (only filler groups, or every response masked), or whose
gradient is exactly zero, takes no optimiser step either: AdamW would still move the weights
by its stale momentum and weight decay. It is reported as `empty_update` and counted. The
update donates its `TrainState` argument (its buffers become the new state's): a caller that
keeps the state it passes in must pass a copy.

Every function takes the policy as its pure-dict parameter tree and merges it with the run's
`ModelDef` inside jit (the sampler does the same): one form of the policy. When the tree holds
LoRA adapters (models/lora.py), the update differentiates and AdamW-updates only them (the
optimizer state is theirs alone); the frozen base goes through the jitted step unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gtpo_jax.config import Config
from gtpo_jax.losses import LossBatch, compute_loss, finalize_diagnostics, merge_diagnostics, prepare_batch
from gtpo_jax.models.lora import join, split_trainable
from gtpo_jax.models.sharding import ModelDef, batch_sharding, batch_width, rows_sharding
from gtpo_jax.rollout.sampler import FINISH_LENGTH
from gtpo_jax.scoring import score
from gtpo_jax.training.state import TrainState


class Groups(NamedTuple):
    """Token arrays of a rollout batch, every leaf leading with `P`."""

    prompts: jax.Array  # [P, Lp] int32, left-padded
    prompt_valid: jax.Array  # [P, Lp] bool
    tokens: jax.Array  # [P, G, T] int32
    mask: jax.Array  # [P, G, T] bool


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The jitted functions of a training run, built once by `step_fns`."""

    # (params, groups) -> (logp, entropy) [P, G, T], in micro-batches of `micro_rows` sequences.
    score: Callable
    # (verdicts (rewards, valid, correct, informative), groups, lengths, finish_reason, old_logp, entropy, ref_logp)
    #   -> (LossBatch, diagnostics)
    prepare: Callable
    # (state, groups, loss_batch) -> (state, metrics, diagnostics): one optimiser step on a
    # mini-batch, in micro-batches of `micro_rows` sequences; `state` is donated.
    update: Callable
    # (tree, start) -> the mini-batch of `(Groups, LossBatch)` prompts [start, start + n), split over the devices.
    take: Callable
    mini_batch_rows: int  # prompts per mini-batch
    micro_rows: int  # sequences per micro-batch (train.micro_batch_size, 0 resolved)
    padded_micro_rows: int  # the same padded to a multiple of the mesh's batch width


def micro_split(rows: int, size: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The row split of the scoring pass and the update: `rows` sequence rows in consecutive
    micro-batches of `size` (the last one shorter when `size` does not divide `rows`), each padded
    to a multiple of `width` rows. Returns `(index, real)`, both `[micro-batches, padded]`: the
    source row of each slot, and whether it is real; a padding slot repeats a real row (finite
    activations) and must be masked out of the loss."""
    size = min(size, rows)
    count, padded = -(-rows // size), -(-size // width) * width
    slot, start = np.arange(padded), np.arange(count)[:, None] * size
    real = (slot < size) & (start + slot < rows)
    return (start + slot % size) % rows, real


def _flat(x: jax.Array, index: np.ndarray) -> jax.Array:
    """`[P, G, ...]` -> rows `index` of `[P * G, 1, ...]` (each sequence a group of one)."""
    return x.reshape(x.shape[0] * x.shape[1], 1, *x.shape[2:])[index]


def group_rows(groups: Groups, index: np.ndarray) -> Groups:
    """The sequence rows `index` of `groups`, each with its own copy of its prompt."""
    prompt = index // groups.tokens.shape[1]
    return Groups(groups.prompts[prompt], groups.prompt_valid[prompt], *(_flat(x, index) for x in groups[2:]))


def batch_rows(batch: LossBatch, index: np.ndarray, real: np.ndarray) -> LossBatch:
    """The sequence rows `index` of `batch` (every leaf `[P, G, ...]`), padding slots masked out."""
    rows = jax.tree.map(lambda x: _flat(x, index), batch)
    return rows._replace(mask=rows.mask * real.reshape(*real.shape, 1, 1).astype(rows.mask.dtype))


def _micro_layout(mesh: Mesh) -> Callable:
    """`[micro-batches, rows, ...]` leaves with each micro-batch's rows split over the batch axes."""

    def layout(tree: Any) -> Any:
        def place(x: jax.Array) -> jax.Array:
            if x.shape[1] % batch_width(mesh):
                return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec()))
            spec = batch_sharding(mesh, x.ndim - 1).spec
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(None, *spec)))

        return jax.tree.map(place, tree)

    return layout


def _scorer(model: ModelDef, cfg: Config) -> Callable:
    """`(params, groups) -> (logp, entropy)` of one chunk, unjitted."""
    r, m = cfg.rollout, cfg.model

    def run(params: Any, groups: Groups, dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        return score(
            model.merge(params),
            groups.prompts,
            groups.prompt_valid,
            groups.tokens,
            groups.mask,
            temperature=r.temperature,
            token_chunk=m.token_chunk,
            vocab_chunk=m.vocab_chunk,
            dropout_key=dropout_key,
        )

    return run


def _on_rows(mesh: Mesh, tree: Any) -> Any:
    """Every leaf of `tree` split by its leading (rows) dimension over the mesh's batch axes
    (`rows_sharding`): without it, a gather or a whole-batch computation leaves its output
    replicated, a whole `[P, G, T]` float32 array on every device."""
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rows_sharding(mesh, x.shape)), tree)


def _prepare_fn(cfg: Config, mesh: Mesh) -> Callable:
    @jax.jit
    def prepare(verdicts, groups: Groups, lengths, finish_reason, old_logp, entropy, ref_logp):
        rewards, valid, correct, informative = verdicts
        truncated = finish_reason == FINISH_LENGTH
        batch, diagnostics = prepare_batch(
            cfg.loss,
            rewards=rewards,
            mask=groups.mask,
            old_logp=old_logp,
            entropy=entropy,
            lengths=lengths,
            truncated=truncated,
            ref_logp=ref_logp,
            valid=valid,
            correct=correct,
            informative=informative,
        )
        return _on_rows(mesh, batch), diagnostics

    return prepare


def _update_fn(scorer: Callable, cfg: Config, optimizer: optax.GradientTransformation, split: Callable) -> Callable:
    """The jitted update of one mini-batch, its gradient accumulated over the micro-batches of
    `split` (`(groups, batch) -> (Groups, LossBatch)` of `[micro-batches, rows, ...]`)."""

    def loss_sum(trainable, frozen, groups: Groups, batch: LossBatch, key):
        logp, _ = scorer(join(trainable, frozen), groups, key)
        out = compute_loss(cfg.loss, logp, batch, padded_len=cfg.rollout.max_new_tokens)
        return out.loss_sum, (out.denominator, out.diagnostics)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)  # w.r.t. the trainable part only

    def gradients(trainable, frozen, groups, batch, key):
        """Sum of the micro-batches' gradients, loss sums and denominators, and their diagnostics."""

        def accumulate(carry, micro):
            grads, total, den, diag = carry
            (value, (d, diagnostics)), g = grad_fn(trainable, frozen, *micro)
            return (jax.tree.map(jnp.add, grads, g), total + value, den + d, merge_diagnostics(diag, diagnostics)), None

        micros = split(groups, batch)
        keys = None if key is None else jax.random.split(key, micros[0].tokens.shape[0])
        micros = (*micros, keys)
        (v0, (d0, diag0)), g0 = grad_fn(trainable, frozen, *jax.tree.map(lambda x: x[0], micros))
        rest = jax.tree.map(lambda x: x[1:], micros)
        return jax.lax.scan(accumulate, (g0, v0, d0, diag0), rest)[0]

    @functools.partial(jax.jit, donate_argnums=0)
    def update(state: TrainState, groups: Groups, batch: LossBatch, dropout_key: jax.Array | None = None):
        # With LoRA adapters only they are differentiated and updated; the frozen base passes through.
        trainable, frozen = split_trainable(state.params)
        grads, total, den, diag = gradients(trainable, frozen, groups, batch, dropout_key)
        scale = 1.0 / jnp.maximum(den, 1e-12)
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(total)
        # No loss token, or a gradient of exactly 0 (every group of the mini-batch uninformative
        # without dynamic sampling): no signal, so no step (AdamW would still move the weights).
        has_tokens = (den > 0) & (grad_norm > 0)
        apply = finite & has_tokens
        updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        params = optax.apply_updates(trainable, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)  # noqa: E731
        new_state = state._replace(
            params=join(keep(params, trainable), frozen),
            opt_state=keep(opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": total * scale,
            "grad_norm": grad_norm,
            "update_finite": finite.astype(jnp.float32),
            "empty_update": (~has_tokens).astype(jnp.float32),
        }
        return new_state, metrics, diag

    return update


def mini_batch_fn(mesh: Mesh, n: int) -> Callable:
    """`(tree, start) -> prompts [start, start + n)` of every leaf of `tree` (`(Groups, LossBatch)`),
    laid out split over the mesh's batch axes when they divide `n` (an eager slice would come back
    replicated on every device); the update re-splits them into micro-batches of sequences."""

    @jax.jit
    def take(tree: Any, start: jax.Array) -> Any:
        return _on_rows(mesh, jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, n, axis=0), tree))

    return take


def response_buckets(cfg: Config) -> tuple[int, ...]:
    """The response lengths the scoring pass and the update run over (`train.length_buckets`)."""
    T = cfg.rollout.max_new_tokens
    return tuple(sorted({-(-T // 2**k) for k in range(cfg.train.length_buckets)}))


def response_width(cfg: Config, longest: int) -> int:
    """The smallest length bucket holding the batch's longest response."""
    return next(b for b in response_buckets(cfg) if b >= longest)


def micro_rows(cfg: Config) -> int:
    """Sequences per micro-batch (`train.micro_batch_size`; 0 = a mini-batch's)."""
    t = cfg.train
    return t.micro_batch_size or t.prompts_per_step // t.mini_batches * cfg.loss.group_size


def step_fns(model: ModelDef, cfg: Config, optimizer: optax.GradientTransformation, mesh: Mesh) -> StepFns:
    """The run's jitted step functions. The scoring pass and the update cut their sequence rows
    the same way (`micro_split`); a micro-batch that the mesh's batch width does not divide is
    padded with masked rows, and that waste is logged here, once."""
    scorer, t, size, width = _scorer(model, cfg), cfg.train, micro_rows(cfg), batch_width(mesh)
    layout, padded = _micro_layout(mesh), -(-size // width) * width
    if padded != size:
        why = "a multiple of the mesh's batch width %d (%.0f%% more compute in the scoring pass and the update)"
        logging.warning(
            "train.micro_batch_size=%d: a micro-batch of %d sequences is padded to %d, " + why + "; set it to a "
            "multiple of %d",
            t.micro_batch_size,
            size,
            padded,
            width,
            100 * (padded / size - 1),
            width,
        )

    def split(groups: Groups, batch: LossBatch | None = None) -> Any:
        P, G = groups.tokens.shape[:2]
        index, real = micro_split(P * G, size, width)
        rows = group_rows(groups, index)
        return layout(rows if batch is None else (rows, batch_rows(batch, index, real)))

    @jax.jit
    def score_all(params, groups: Groups):
        P, G, T = groups.tokens.shape
        keep = np.flatnonzero(micro_split(P * G, size, width)[1])  # the real slots, in row order
        logp, entropy = jax.lax.map(lambda g: scorer(params, g), split(groups))
        return _on_rows(mesh, tuple(x.reshape(-1, T)[keep].reshape(P, G, T) for x in (logp, entropy)))

    n = t.prompts_per_step // t.mini_batches
    update = _update_fn(scorer, cfg, optimizer, split)
    return StepFns(score_all, _prepare_fn(cfg, mesh), update, mini_batch_fn(mesh, n), n, size, padded)


def train_on(fns: StepFns, state: TrainState, groups: Groups, loss_batch: LossBatch, cfg: Config):
    """`ppo_epochs` x `mini_batches` optimiser steps on one rollout batch (groups kept whole):
    `(state, metrics)`. A mini-batch without loss tokens takes no step; `empty_updates` counts them."""
    t0, diag, metrics = time.time(), None, []
    dropout = cfg.model.lora_rank > 0 and cfg.model.lora_dropout > 0
    for epoch in range(cfg.train.ppo_epochs):
        for i in range(cfg.train.mini_batches):
            mini = fns.take((groups, loss_batch), jnp.int32(i * fns.mini_batch_rows))
            state, m, d = fns.update(state, *mini, state.key(1, epoch, i) if dropout else None)
            metrics.append(jax.device_get(m))
            diag = d if diag is None else merge_diagnostics(diag, d)
    jax.block_until_ready(state.params)
    empty = int(sum(m["empty_update"] for m in metrics))
    trained = [m for m in metrics if not m["empty_update"]]
    if empty:
        logging.warning("%d of %d optimiser updates had no loss tokens and were skipped", empty, len(metrics))
    mean = lambda k: float(np.mean([float(m[k]) for m in trained])) if trained else float("nan")  # noqa: E731
    return state, {
        **finalize_diagnostics(diag),
        "loss": mean("loss"),
        "grad_norm": mean("grad_norm"),
        "skipped_updates": float(state.skipped),
        "empty_updates": float(empty),
        "update_time_s": time.time() - t0,
    }
