"""The teacher-forced scoring pass: log-probs and entropy of response tokens, `[P, G, T]`.

One forward pass of the policy over `prompt ++ response` gives, for every response token, the
log-prob of the sampled token and the full-vocabulary entropy at the sampling temperature
(GTPO's `H`). Logits at position `t` score token `t + 1`, so response token `t` is scored by
the hidden state at `Lp - 1 + t`. Both come from `ops/logprobs.py` (vocabulary-chunked,
float32); the entropy is wrapped in `stop_gradient` (it is a constant of the loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gtpo_jax.models.transformer import Transformer, positions_from_valid
from gtpo_jax.ops.logprobs import token_logprobs_and_entropy


def score(
    model: Transformer,
    prompts: Int[Array, "P Lp"],
    prompt_valid: Bool[Array, "P Lp"],
    responses: Int[Array, "P G T"],
    response_mask: Array,
    *,
    temperature: float = 1.0,
    token_chunk: int = 1024,
    vocab_chunk: int = 16384,
    dropout_key: Array | None = None,
) -> tuple[Float[Array, "P G T"], Float[Array, "P G T"]]:
    """`(logp, entropy)` of each response token under `model`; 0 on padding.

    `prompts` are left-padded (`prompt_valid` False on padding) and shared by the `G`
    responses of their group; `responses` are right-padded (`response_mask` 0 on padding).
    `dropout_key` draws the LoRA adapters' dropout (the update's passes only).
    """
    P, G, T = responses.shape
    Lp = prompts.shape[1]
    if prompts.shape[0] != P:
        raise ValueError(f"prompts {prompts.shape} and responses {responses.shape} disagree on P")
    if Lp == 0:
        raise ValueError("score needs at least one prompt token (position Lp - 1 scores the first response token)")
    mask = jnp.asarray(response_mask) > 0
    tokens = jnp.concatenate([jnp.repeat(prompts, G, axis=0), responses.reshape(P * G, T)], axis=1)
    valid = jnp.concatenate([jnp.repeat(prompt_valid, G, axis=0), mask.reshape(P * G, T)], axis=1)
    hidden, _ = model(tokens, positions_from_valid(valid), valid, dropout_key=dropout_key)
    logp, entropy = token_logprobs_and_entropy(
        hidden[:, Lp - 1 : Lp - 1 + T],
        model.unembedding(),
        responses.reshape(P * G, T),
        temperature=temperature,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
    )
    logp = jnp.where(mask, logp.reshape(P, G, T), 0.0)
    entropy = jnp.where(mask, jax.lax.stop_gradient(entropy).reshape(P, G, T), 0.0)
    return logp, entropy
