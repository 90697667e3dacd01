"""The jitted pieces of one RL step: the scoring pass, and the mini-batch policy update.

Shapes: `P` prompts of the (mini-)batch, `Lp` padded prompt length, `G` responses per prompt,
`T` response length. Groups are never split: micro- and mini-batches slice `P`.

The update accumulates over `micro_batches` with `lax.scan`: each micro-batch contributes the
gradient of its loss *sum* and its *denominator*; the gradient of the mini-batch loss is
`sum(grad loss_sum) / sum(denominator)` — exactly the gradient of `sum / sum` because the
denominator does not depend on the parameters. A gradient (or loss) that is not finite skips
the update: parameters and optimiser state are kept, and `skipped` is incremented. A
mini-batch with no loss tokens (only filler groups, or every response masked), or whose
gradient is exactly zero, takes no optimiser step either: AdamW would still move the weights
by its stale momentum and weight decay. It is reported as `empty_update` and counted by the
loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import optax

from gtpo_jax.losses import LossBatch, LossConfig, compute_loss, merge_diagnostics, prepare_batch
from gtpo_jax.models.sharding import merge_params
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
    """The jitted functions of a run (built once; `graphdef` / `abstract` describe the policy)."""

    graphdef: Any
    abstract: Any
    loss_cfg: LossConfig
    optimizer: optax.GradientTransformation
    temperature: float
    token_chunk: int
    vocab_chunk: int
    micro_batches: int

    def model(self, params: Any) -> nnx.Module:
        return merge_params(self.graphdef, self.abstract, params)

    def _score(self, params: Any, groups: Groups) -> tuple[jax.Array, jax.Array]:
        return score(
            self.model(params), groups.prompts, groups.prompt_valid, groups.tokens, groups.mask,
            temperature=self.temperature, token_chunk=self.token_chunk, vocab_chunk=self.vocab_chunk,
        )  # fmt: skip

    def score_fn(self):
        """`(params, groups) -> (logp, entropy)` `[P, G, T]`, in `micro_batches` chunks of prompts."""

        @jax.jit
        def run(params, groups: Groups):
            chunks = _split(groups, self.micro_batches)
            logp, entropy = jax.lax.map(lambda g: self._score(params, g), chunks)
            return _merge(logp), _merge(entropy)

        return run

    def prepare_fn(self):
        """`(rewards, valid, groups, old_logp, entropy, lengths, truncated, ref_logp) -> (LossBatch, diagnostics)`."""

        @jax.jit
        def run(rewards, valid, groups: Groups, old_logp, entropy, lengths, truncated, ref_logp):
            return prepare_batch(
                self.loss_cfg, rewards=rewards, mask=groups.mask, old_logp=old_logp, entropy=entropy,
                lengths=lengths, truncated=truncated, ref_logp=ref_logp, valid=valid,
            )  # fmt: skip

        return run

    def update_fn(self):
        """`(state, groups, loss_batch) -> (state, metrics)`: one optimiser step on a mini-batch."""

        def loss_sum(params, groups: Groups, batch: LossBatch):
            logp, _ = self._score(params, groups)
            out = compute_loss(self.loss_cfg, logp, batch)
            return out.loss_sum, (out.denominator, out.diagnostics)

        grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

        @jax.jit
        def run(state: TrainState, groups: Groups, batch: LossBatch):
            def accumulate(carry, micro):
                grads, total, den, diag = carry
                (value, (d, diagnostics)), g = grad_fn(state.params, *micro)
                diag = diagnostics if diag is None else merge_diagnostics(diag, diagnostics)
                return (jax.tree.map(jnp.add, grads, g), total + value, den + d, diag), None

            micros = _split((groups, batch), self.micro_batches)
            first = jax.tree.map(lambda x: x[0], micros)
            (v0, (d0, diag0)), g0 = grad_fn(state.params, *first)
            rest = jax.tree.map(lambda x: x[1:], micros)
            (grads, total, den, diag), _ = jax.lax.scan(accumulate, (g0, v0, d0, diag0), rest)
            scale = 1.0 / jnp.maximum(den, 1e-12)
            grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(grad_norm) & jnp.isfinite(total)
            # No loss token, or a gradient of exactly 0 (every group of the mini-batch uninformative
            # without dynamic sampling): no signal, so no step (AdamW would still move the weights).
            has_tokens = (den > 0) & (grad_norm > 0)
            apply = finite & has_tokens
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)  # noqa: E731
            new_state = state._replace(
                params=keep(params, state.params),
                opt_state=keep(opt_state, state.opt_state),
                skipped=state.skipped + (~finite).astype(jnp.int32),
            )
            metrics = {"loss": total * scale, "grad_norm": grad_norm, "update_finite": finite.astype(jnp.float32),
                       "empty_update": (~has_tokens).astype(jnp.float32)}  # fmt: skip
            return new_state, metrics, diag

        return run


def mini_batch_fn(mesh: Any, n: int, padded: int):
    """`(tree, start) -> rows [start, start + n)` of every leaf, padded to `padded` rows and laid
    out split over the mesh's batch axes (an eager slice would come back replicated on every
    device). Padding repeats real rows (finite activations) with a zero loss mask, so it adds
    nothing to the loss sums or denominators; `tree` is `(Groups, LossBatch)`."""
    from gtpo_jax.models.sharding import rows_sharding

    @jax.jit
    def take(tree: Any, start: jax.Array) -> Any:
        rows = start + jnp.arange(padded) % n
        groups, batch = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), tree)
        real = (jnp.arange(padded) < n).astype(batch.mask.dtype)
        batch = batch._replace(mask=batch.mask * real.reshape(-1, *([1] * (batch.mask.ndim - 1))))
        return jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(x, rows_sharding(mesh, x.shape)), (groups, batch)
        )

    return take


def _split(tree: Any, n: int) -> Any:
    """Leading axis `P` -> `[n, P / n]` (contiguous chunks of whole groups)."""
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), tree)


def _merge(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
