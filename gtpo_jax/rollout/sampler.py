"""A jitted KV-cache sampler that draws `G` responses per prompt, shaped `[P, G, T]`.

One call: prefill the `P` left-padded prompts **once** (`[P, Lp]` into a cache of `Lp + T`
slots), copy each prompt's cache to its `G` samples (`[P * G]` rows), then decode with a
`while_loop` that stops as soon as every row has emitted a stop token or `T` tokens exist.
Every shape is static, so the function compiles once per (P, prompt bucket, G, T).

Sampling: logits / temperature, then top-k and top-p (nucleus) filtering, then a categorical
draw with a key derived from the call's key, the step and the row (deterministic for a given
key, whatever the sharding). `temperature = 0` is greedy. The log-prob returned for each
sampled token is `log softmax(logits / temperature)` over the **full** vocabulary (at
temperature 1 when greedy): the same quantity the scoring pass computes, so the importance
ratio of an on-policy update starts at exactly 1.

A response ends with its stop token, which is kept (tokens and mask include it); a response
that reaches `T` tokens without one is flagged `FINISH_LENGTH`. Positions after the end hold
`pad_id`, mask 0 and log-prob 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jaxtyping import Array, Bool, Float, Int

from gtpo_jax.models.transformer import KVCache, Transformer, positions_from_valid

FINISH_STOP = 0  # ended with a stop token
FINISH_LENGTH = 1  # reached max_new_tokens


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How responses are drawn."""

    # Responses per prompt (G).
    group_size: int = 16
    # Length limit of a response in tokens (T); responses are padded to it.
    max_new_tokens: int = 256
    # Softmax temperature; 0 = greedy (argmax).
    temperature: float = 1.0
    # Keep only the k most likely tokens; 0 = no limit.
    top_k: int = 0
    # Keep the smallest set of tokens whose probability reaches top_p; 1.0 = no limit.
    top_p: float = 1.0
    # Token ids that end a response (kept as its last token).
    stop_token_ids: tuple[int, ...] = ()
    # Token id written after the end of a response.
    pad_id: int = 0
    # Prompt lengths are padded up to the smallest bucket that fits, bounding compilations.
    prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, what: str) -> None:
            if not ok:
                raise ValueError(f"sampling.{field}={getattr(self, field)!r}: {what}")

        check(self.group_size >= 1, "group_size", "must be >= 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)")
        check(self.top_k >= 0, "top_k", "must be >= 0 (0 = off)")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(len(self.prompt_buckets) > 0 and list(self.prompt_buckets) == sorted(self.prompt_buckets),
              "prompt_buckets", "must be a non-empty increasing tuple")  # fmt: skip
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


class Rollout(NamedTuple):
    """What the sampler returns; every array leads with `[P, G]`."""

    tokens: Int[Array, "P G T"]
    mask: Bool[Array, "P G T"]
    logp: Float[Array, "P G T"]  # sampler's log-prob of each token (full vocabulary, at the temperature)
    lengths: Int[Array, "P G"]
    finish_reason: Int[Array, "P G"]  # FINISH_STOP or FINISH_LENGTH


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"prompt of {length} tokens is longer than the largest prompt bucket {buckets[-1]}")


def pad_prompts(prompts: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to the bucket of the longest: `(tokens [P, Lp], valid [P, Lp])`."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    width = bucket_length(max(len(p) for p in prompts), buckets)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = p
        valid[i, width - len(p) :] = True
    return tokens, valid


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


def _draw(logits: Float[Array, "B V"], key: Array, cfg: SamplingConfig) -> tuple[Array, Array]:
    """Token and its full-vocabulary log-prob at the sampling temperature, per row."""
    temperature = cfg.temperature if cfg.temperature > 0 else 1.0
    scaled = logits.astype(jnp.float32) / temperature
    if cfg.temperature == 0 or cfg.top_k == 1:
        token = jnp.argmax(scaled, axis=-1)
    else:
        keys = jax.random.split(key, scaled.shape[0])
        filtered = filter_logits(scaled, cfg.top_k, cfg.top_p)
        token = jax.vmap(jax.random.categorical)(keys, filtered)
    logp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), logp


@nnx.jit(static_argnames="cfg")
def sample(
    model: Transformer, prompts: Int[Array, "P Lp"], prompt_valid: Bool[Array, "P Lp"], key: Array, cfg: SamplingConfig
) -> Rollout:
    """Draws `cfg.group_size` responses for each left-padded prompt (see the module docstring)."""
    P, Lp = prompts.shape
    G, T = cfg.group_size, cfg.max_new_tokens
    B = P * G
    stops = jnp.asarray(cfg.stop_token_ids or (-1,), jnp.int32)

    positions = positions_from_valid(prompt_valid)
    cache = KVCache.empty(model.cfg, P, Lp + T)
    hidden, cache = model(prompts, positions, prompt_valid, cache)
    # Copy each prompt's cache and last logits to its G samples: row p * G + g.
    cache = KVCache(
        jnp.repeat(cache.k, G, axis=1), jnp.repeat(cache.v, G, axis=1), jnp.repeat(cache.valid, G, axis=0), cache.end
    )
    logits = jnp.repeat(model.logits(hidden[:, -1:])[:, 0], G, axis=0)
    next_position = jnp.repeat(jnp.sum(prompt_valid, axis=1), G)  # real prompt tokens: first response position

    token, logp = _draw(logits, jax.random.fold_in(key, 0), cfg)
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
        token, logp = _draw(model.logits(hidden)[:, 0], jax.random.fold_in(key, step), cfg)
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


class Sampler:
    """`sample` over token lists, with prompt bucketing and a log line per new compilation."""

    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.compiled_shapes: set[tuple[int, int]] = set()

    def __call__(
        self, model: Transformer, prompts: Sequence[Sequence[int]], key: Array, *, put=None
    ) -> tuple[Rollout, np.ndarray, np.ndarray]:
        """Returns the rollout and the padded prompts `(tokens, valid)` it was drawn from.

        `put` places the padded prompt arrays on devices (default `jnp.asarray`); a trainer on a
        mesh passes one that splits them over the batch axes (and builds global arrays when it
        runs as several processes).
        """
        tokens, valid = pad_prompts(prompts, self.cfg.prompt_buckets, self.cfg.pad_id)
        shape = tokens.shape
        if shape not in self.compiled_shapes:
            self.compiled_shapes.add(shape)
            logging.info(
                "sampler: compiling for P=%d prompt bucket=%d G=%d T=%d (%d shapes so far)",
                shape[0], shape[1], self.cfg.group_size, self.cfg.max_new_tokens, len(self.compiled_shapes),
            )  # fmt: skip
        put = jnp.asarray if put is None else put
        return sample(model, put(tokens), put(valid), key, self.cfg), tokens, valid
