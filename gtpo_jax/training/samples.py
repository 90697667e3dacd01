"""Tables of sampled completions: every `metrics.samples_every` steps, `metrics.samples_per_step`
of the step's responses with what the loss made of them, written to `run_dir/samples.jsonl` and,
with W&B on, logged as a `wandb.Table` (training/metrics.py).

The per-response means come from the loss batch the step already computed (entropy and
advantages, `[P, G, T]`, or `[P, G]` advantages for sequence recipes), averaged over each
response's tokens on the devices; only on sample steps are they, and the tokens, brought to the
host (a collective: every process calls `write_samples` at the same steps; process 0 writes).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gtpo_jax.parallel.placement import gather_rows
from gtpo_jax.training.build import Run
from gtpo_jax.training.collect import GroupBatch
from gtpo_jax.training.metrics import MetricsWriter

# The columns of a sample row, in order (the W&B table's columns; samples.jsonl adds "step").
COLUMNS = ("prompt", "response", "reward", "o_plus", "entropy_mean", "advantage_mean", "length", "finish_reason")


@jax.jit
def response_means(entropy: jax.Array, advantages: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`[P, G]` mean token entropy and mean advantage over each response's tokens (`mask` `[P, G, T]`);
    a sequence recipe's `[P, G]` advantages are returned as they are."""
    m = mask.astype(jnp.float32)
    count = jnp.maximum(m.sum(-1), 1.0)
    entropy_mean = (entropy * m).sum(-1) / count
    advantage_mean = advantages if advantages.ndim == 2 else (advantages * m).sum(-1) / count
    return entropy_mean, advantage_mean


def picked(num_prompts: int, group_size: int, n: int) -> list[tuple[int, int]]:
    """`(prompt, response)` of `n` responses spread over the groups: response 0 of each group, then 1, ..."""
    return [(i % num_prompts, i // num_prompts) for i in range(min(n, num_prompts * group_size))]


def sample_rows(run: Run, batch: GroupBatch, loss_batch: Any, n: int) -> list[dict[str, Any]]:
    """`n` rows of `COLUMNS` from the step's batch and its loss batch (`losses.LossBatch`)."""
    r = batch.rollout
    width = loss_batch.entropy.shape[-1]  # the step's length bucket (training/loop.py loss_inputs)
    entropy, advantage = response_means(loss_batch.entropy, loss_batch.advantages, r.mask[..., :width])
    host = gather_rows((r.tokens, r.mask, batch.prompts, batch.prompt_valid, entropy, advantage, loss_batch.correct))
    tokens, mask, prompts, prompt_valid, entropy, advantage, correct = host
    rows = []
    for p, g in picked(*batch.rewards.shape, n):
        rows.append(
            {
                "prompt": run.tok.decode(prompts[p][prompt_valid[p]]),
                "response": run.tok.decode(tokens[p, g][mask[p, g]]),
                "reward": float(batch.rewards[p, g]),
                "o_plus": bool(correct[p, g]),
                "entropy_mean": float(entropy[p, g]),
                "advantage_mean": float(advantage[p, g]),
                "length": int(batch.lengths[p, g]),
                "finish_reason": "length" if batch.truncated[p, g] else "stop",
            }
        )
    return rows


def write_samples(run: Run, metrics: MetricsWriter, batch: GroupBatch, loss_batch: Any, step: int) -> None:
    """At steps that are multiples of `metrics.samples_every` (0 = never), the step's sample rows."""
    every, n = run.cfg.metrics.samples_every, run.cfg.metrics.samples_per_step
    if every and step % every == 0:
        metrics.samples(step, sample_rows(run, batch, loss_batch, n), COLUMNS)
