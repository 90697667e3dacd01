"""Evaluation: avg@k and pass@k of a policy on held-out prompts, with the training verifiers.

`avg@k` is the mean correctness of `k` samples per prompt (the paper's headline metric);
`pass@k` uses the unbiased estimator `1 - C(n - c, k) / C(n, k)` over `n >= k` samples with `c`
correct (Chen et al., 2021), here with `n = samples`. A sample whose reward errored, timed out
or crashed counts as not solved, and their fraction is reported: a broken verifier shows, not a
weak policy. The draws are a pure function of the run's seed (`eval_key`), so the start and the
end of a run, and a later `python -m gtpo_jax.evaluate`, see the same prompts and random draws.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from gtpo_jax.rewards.pool import RewardPool
from gtpo_jax.training.build import Run, eval_chunk
from gtpo_jax.training.collect import draw

EVAL_STREAM = 1_000_003  # folded into the run's seed: evaluation draws apart from training's


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def eval_key(seed: int) -> jax.Array:
    """The evaluation's key: the same prompts and draws at every evaluation of a run."""
    return jax.random.fold_in(jax.random.key(seed), EVAL_STREAM)


def evaluate_policy(
    run: Run,
    params: Any,
    pool: RewardPool,
    records: Sequence[dict[str, Any]],
    key: jax.Array,
    *,
    samples: int,
    temperature: float,
) -> dict[str, float]:
    """`{"avg@k", "pass@1", "pass@2", ..., "pass@k", "prompts", "reward_invalid_frac"}` over `records`,
    `k = samples` (1 when greedy; see `summarize`). The prompts are drawn in sampler calls of
    `build.eval_chunk` prompts: at most `rollout.batch_size` sequences, their rows a multiple of
    the mesh's batch width, so the decode stays split over the devices instead of being
    replicated on each; the last call is padded to the same shape (one compilation)."""
    k = 1 if temperature == 0 else samples
    sampling = run.sampling._replace(
        rollout=dataclasses.replace(run.cfg.rollout, temperature=temperature), group_size=k
    )
    chunk = eval_chunk(run.cfg, run.place.width, k, len(records))
    correct_counts: list[int] = []
    invalid = 0
    for start in range(0, len(records), chunk):
        part = list(records[start : start + chunk])
        real = len(part)
        part += [part[-1]] * (chunk - real)  # one compiled shape for every chunk
        batch = draw(run, params, pool, part, jax.random.fold_in(key, start), sampling)
        correct = ((batch.rewards > run.cfg.loss.success_threshold) & batch.valid)[:real]
        invalid += int((~batch.valid)[:real].sum())
        correct_counts += [int(c) for c in correct.sum(axis=1)]
    return summarize(correct_counts, k, invalid)


def summarize(correct_counts: Sequence[int], k: int, invalid: int = 0) -> dict[str, float]:
    """avg@k, pass@j for j = 1, 2, 4, ..., k (and k itself), the prompt count and the invalid
    fraction, from the number of correct samples of each prompt (`k` samples each)."""
    n = len(correct_counts)
    ks = sorted({2**i for i in range(k.bit_length()) if 2**i <= k} | {k})
    return {
        f"avg@{k}": float(np.sum(correct_counts) / (n * k)),
        **{f"pass@{j}": float(np.mean([pass_at_k(k, c, j) for c in correct_counts])) for j in ks},
        "prompts": float(n),
        "reward_invalid_frac": invalid / (n * k),
    }


def pass_curve(result: dict[str, float]) -> dict[int, float]:
    """`{k: pass@k}` of an evaluation result (the sampled pass@k, not the greedy one)."""
    return {int(key[5:]): v for key, v in result.items() if key.startswith("pass@")}


def evaluate(
    run: Run,
    params: Any,
    pool: RewardPool,
    records: Sequence[dict[str, Any]],
    *,
    samples: int | None = None,
    num_prompts: int | None = None,
) -> dict[str, float]:
    """`evaluate_policy` as the config's `eval` section asks (`samples`, `num_prompts` override it),
    plus `greedy_pass@1` under `eval.greedy`; `{}` when there are no held-out records. Runs under
    `jax.set_mesh(run.mesh)`, as training does: the decode keeps its rows split over the batch
    axes (`models.transformer.shard_rows`) whatever the prompts' own layout."""
    e = run.cfg.eval
    records = list(records[: num_prompts or e.num_prompts])
    if not records:
        return {}
    key = eval_key(run.cfg.train.seed)
    with jax.set_mesh(run.mesh):
        result = evaluate_policy(
            run, params, pool, records, key, samples=samples or e.samples, temperature=e.temperature
        )
        if e.greedy and e.temperature > 0:
            greedy = evaluate_policy(run, params, pool, records, key, samples=1, temperature=0.0)
            result["greedy_pass@1"] = greedy["pass@1"]
            result["reward_invalid_frac"] = max(result["reward_invalid_frac"], greedy["reward_invalid_frac"])
    return result
