"""A jitted KV-cache sampler that draws `G` responses per prompt, shaped `[P, G, T]`.

One call: prefill the `P` left-padded prompts **once** (`[P, Lp]` into a cache of `Lp + T`
slots), copy each prompt's cache to its `G` samples (`[P * G]` rows), then decode with a
`while_loop` that stops as soon as every row has emitted a stop token or `T` tokens exist.
Every shape is static, so the function compiles once per (P, prompt bucket, G, T). The policy
comes in as its parameter tree (the same one the update trains) and is merged with its graph
inside the compiled function: there is one form of the policy, never a host-side module.

Sampling: logits / temperature, then top-k and top-p (nucleus) filtering, then a categorical
draw with a key derived from the call's key, the step and the row (deterministic for a given
key, whatever the sharding). A step's rollout may be drawn in several calls of fewer rows
(`rollout.batch_size`, training/collect.py `draw`): each call is told the rows of the whole
draw (`total_rows`, static) and where its own start (`row_offset`), and takes its row keys
from the whole draw's `split(fold_in(key, step), total_rows)`, so the chunks draw exactly the
tokens one call would. `temperature = 0` is greedy. The log-prob returned for each
sampled token is `log softmax(logits / temperature)` over the **full** vocabulary (at
temperature 1 when greedy): the same quantity the scoring pass computes, so the importance
ratio of an on-policy update starts at exactly 1.

A response ends with its stop token, which is kept (tokens and mask include it); a response
that reaches `T` tokens without one is flagged `FINISH_LENGTH`. Positions after the end hold
`pad_id`, mask 0 and log-prob 0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gtpo_jax.config import RolloutSection
from gtpo_jax.models.sharding import ModelDef
from gtpo_jax.models.transformer import KVCache, positions_from_valid

FINISH_STOP = 0  # ended with a stop token
FINISH_LENGTH = 1  # reached max_new_tokens


class SamplingConfig(NamedTuple):
    """How responses are drawn: the run's rollout section (length limit, temperature, top-k,
    top-p; validated there) and what the tokenizer and the loss add to it."""

    rollout: RolloutSection
    # Responses per prompt (G).
    group_size: int
    # Token ids that end a response (kept as its last token).
    stop_token_ids: tuple[int, ...] = ()
    # Token id written after the end of a response.
    pad_id: int = 0


def sampling_config(
    rollout: RolloutSection | None = None, *, group_size: int, stop_token_ids=(), pad_id: int = 0, **fields: Any
) -> SamplingConfig:
    """A `SamplingConfig` from a rollout section (default: the section's defaults), with rollout
    fields replaced by `fields` (`temperature=0.0`, `max_new_tokens=...`)."""
    rollout = dataclasses.replace(rollout or RolloutSection(), **fields)
    if group_size < 1:
        raise ValueError(f"group_size={group_size}: must be >= 1")
    return SamplingConfig(rollout, int(group_size), tuple(int(t) for t in stop_token_ids), int(pad_id))


class Rollout(NamedTuple):
    """What the sampler returns; every array leads with `[P, G]`."""

    tokens: Int[Array, "P G T"]
    mask: Bool[Array, "P G T"]
    logp: Float[Array, "P G T"]  # sampler's log-prob of each token (full vocabulary, at the temperature)
    lengths: Int[Array, "P G"]
    finish_reason: Int[Array, "P G"]  # FINISH_STOP or FINISH_LENGTH


def filter_logits(logits: Float[Array, "B V"], top_k: int, top_p: float) -> Float[Array, "B V"]:
    """Sets logits outside the top-k and outside the top-p nucleus to -inf (ties at the edge stay)."""
    neg_inf = jnp.finfo(logits.dtype).min
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        kept = jnp.where(before < top_p, ordered, jnp.inf)  # the first token is always kept
        logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), neg_inf, logits)
    return logits


def row_keys(key: Array, rows: int, total_rows: int, row_offset: Array | int) -> Array:
    """Keys of rows `[row_offset, row_offset + rows)` of a draw of `total_rows` rows: slices of
    `split(key, total_rows)`, so a chunk's rows get the keys one call over every row gives them.
    Rows past `total_rows` (a last chunk padded to the common shape) get repeated keys."""
    keys = jax.random.split(key, total_rows)
    if rows == total_rows:
        return keys  # the whole draw in one call: exactly `split(key, rows)`
    data = jax.random.key_data(keys)  # [total_rows, ...] uint32; padded so that every slice fits
    data = jnp.pad(data, ((0, rows), *[(0, 0)] * (data.ndim - 1)), mode="edge")
    return jax.random.wrap_key_data(jax.lax.dynamic_slice_in_dim(data, row_offset, rows), impl=jax.random.key_impl(key))


def _draw(logits: Float[Array, "B V"], key: Array, cfg: SamplingConfig, rows: tuple) -> tuple[Array, Array]:
    """Token and its full-vocabulary log-prob at the sampling temperature, per row; `rows` is
    `(total_rows, row_offset)` of this call within its draw (`row_keys`)."""
    r = cfg.rollout
    temperature = r.temperature if r.temperature > 0 else 1.0
    scaled = logits.astype(jnp.float32) / temperature
    if r.temperature == 0 or r.top_k == 1:
        token = jnp.argmax(scaled, axis=-1)
    else:
        keys = row_keys(key, scaled.shape[0], *rows)
        filtered = filter_logits(scaled, r.top_k, r.top_p)
        token = jax.vmap(jax.random.categorical)(keys, filtered)
    logp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), logp


def _prefill(model: Any, prompts: Array, prompt_valid: Array, G: int, T: int) -> tuple[KVCache, Array, Array]:
    """The prompts' KV cache (`Lp + T` slots) and last logits, copied to each prompt's G samples
    (row `p * G + g`), and each sample's first response position."""
    P, Lp = prompts.shape
    cache = KVCache.empty(model.cfg, P, Lp + T)
    hidden, cache = model(prompts, positions_from_valid(prompt_valid), prompt_valid, cache)
    cache = KVCache(
        jnp.repeat(cache.k, G, axis=1), jnp.repeat(cache.v, G, axis=1), jnp.repeat(cache.valid, G, axis=0), cache.end
    )
    logits = jnp.repeat(model.logits(hidden[:, -1:])[:, 0], G, axis=0)
    return cache, logits, jnp.repeat(jnp.sum(prompt_valid, axis=1), G)  # real prompt tokens: first response position


@functools.partial(jax.jit, static_argnames=("model_def", "cfg", "total_rows"))
def sample(
    model_def: ModelDef,
    params: Any,
    prompts: Int[Array, "P Lp"],
    prompt_valid: Bool[Array, "P Lp"],
    key: Array,
    cfg: SamplingConfig,
    row_offset: Array | int = 0,
    total_rows: int | None = None,
) -> Rollout:
    """Draws `cfg.group_size` responses for each left-padded prompt (see the module docstring).

    `params` is the policy's pure-dict parameter tree, merged with `model_def` inside jit. A chunk
    of a larger draw passes its rows `total_rows` (static; default `P * G`) and its first row
    `row_offset` (traced: the chunks share one compilation)."""
    model, (P, _) = model_def.merge(params), prompts.shape
    G, T = cfg.group_size, cfg.rollout.max_new_tokens
    B = P * G
    rows = (total_rows or B, jnp.asarray(row_offset, jnp.int32))
    stops = jnp.asarray(cfg.stop_token_ids or (-1,), jnp.int32)
    cache, logits, next_position = _prefill(model, prompts, prompt_valid, G, T)

    token, logp = _draw(logits, jax.random.fold_in(key, 0), cfg, rows)
    done = jnp.isin(token, stops)
    state = (
        jnp.ones((), jnp.int32),  # next step to fill
        jnp.full((B, T), cfg.pad_id, jnp.int32).at[:, 0].set(token),
        jnp.zeros((B, T), jnp.float32).at[:, 0].set(logp),
        jnp.where(done, 1, 0).astype(jnp.int32),  # lengths of finished rows (0 = still running)
        token,
        cache,
    )

    def running(state):
        step, _, _, lengths, _, _ = state
        return (step < T) & jnp.any(lengths == 0)

    def decode(state):
        step, tokens, logps, lengths, last, cache = state
        alive = lengths == 0
        hidden, cache = model(last[:, None], (next_position + step - 1)[:, None], alive[:, None], cache)
        token, logp = _draw(model.logits(hidden)[:, 0], jax.random.fold_in(key, step), cfg, rows)
        token = jnp.where(alive, token, cfg.pad_id)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
        logps = jax.lax.dynamic_update_slice_in_dim(logps, jnp.where(alive, logp, 0.0)[:, None], step, axis=1)
        lengths = jnp.where(alive & jnp.isin(token, stops), step + 1, lengths)
        return step + 1, tokens, logps, lengths, token, cache

    _, tokens, logps, lengths, _, _ = jax.lax.while_loop(running, decode, state)
    finish = jnp.where(lengths == 0, FINISH_LENGTH, FINISH_STOP).astype(jnp.int32)
    lengths = jnp.where(lengths == 0, T, lengths)
    mask = jnp.arange(T)[None, :] < lengths[:, None]
    tokens = jnp.where(mask, tokens, cfg.pad_id)
    return Rollout(
        tokens.reshape(P, G, T),
        mask.reshape(P, G, T),
        jnp.where(mask, logps, 0.0).reshape(P, G, T),
        lengths.reshape(P, G),
        finish.reshape(P, G),
    )
