"""Evaluation: pass@k and avg@k of a policy on held-out prompts, with the training verifiers.

    python -m gtpo_jax.evaluate --config=configs/default.py --checkpoint=runs/default [--step=N]

`avg@k` is the mean correctness of `k` samples per prompt (the paper's headline metric);
`pass@k` uses the unbiased estimator `1 - C(n - c, k) / C(n, k)` over `n >= k` samples with `c`
correct (Chen et al., 2021), here with `n = samples`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from gtpo_jax.data.tokenizer import Tokenizer
from gtpo_jax.rewards.pool import RewardPool
from gtpo_jax.rewards.registry import OK
from gtpo_jax.rollout.sampler import Sampler, SamplingConfig
from gtpo_jax.training.collect import score_rollout, to_rows


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_policy(
    model: Any,
    tok: Tokenizer,
    pool: RewardPool,
    records: Sequence[dict[str, Any]],
    encode: Callable[[dict[str, Any]], list[int]],
    key: jax.Array,
    *,
    sampling: SamplingConfig,
    success_threshold: float = 0.5,
    chunk: int = 64,
    put: Callable[[np.ndarray], jax.Array] | None = None,
    row_multiple: int = 1,
) -> dict[str, float]:
    """`{"avg@k", "pass@1", "pass@k", "prompts", "reward_invalid_frac"}` over `records`,
    `k = sampling.group_size`. A sample whose reward errored, timed out or crashed counts as not
    solved, and the fraction of such samples is reported (a broken verifier shows, not a weak
    policy). Chunks are padded to a multiple of `row_multiple` (the mesh's batch width) so the
    prompts stay split over the devices instead of being replicated on each."""
    k = sampling.group_size
    sampler = Sampler(sampling)
    chunk = min(chunk, len(records))
    chunk = -(-chunk // row_multiple) * row_multiple
    correct_counts: list[int] = []
    invalid = 0
    for start in range(0, len(records), chunk):
        part = list(records[start : start + chunk])
        real = len(part)
        part += [part[-1]] * (chunk - real)  # one compiled shape for every chunk
        rollout, _, _ = sampler(model, [encode(r) for r in part], jax.random.fold_in(key, start), put=put)
        rewards, status, _ = score_rollout(to_rows(rollout), part, tok, pool)  # each process scores its own rows
        correct = ((rewards > success_threshold) & (status == OK))[:real]
        invalid += int((status != OK)[:real].sum())
        correct_counts += [int(c) for c in correct.sum(axis=1)]
    n = len(correct_counts)
    return {
        f"avg@{k}": float(np.sum(correct_counts) / (n * k)),
        "pass@1": float(np.mean([pass_at_k(k, c, 1) for c in correct_counts])),
        f"pass@{k}": float(np.mean([pass_at_k(k, c, k) for c in correct_counts])),
        "prompts": float(n),
        "reward_invalid_frac": invalid / (n * k),
    }


def main(argv: list[str]) -> None:
    from gtpo_jax.config import from_config_dict
    from gtpo_jax.training.loop import Trainer

    del argv
    cfg = from_config_dict(_CONFIG.value)
    trainer = Trainer(cfg, for_eval=True)
    step = trainer.restore(_STEP.value if _STEP.value >= 0 else None, directory=_CHECKPOINT.value or None)
    result = trainer.evaluate(samples=_SAMPLES.value or cfg.eval.samples, num_prompts=_PROMPTS.value or None)
    print(json.dumps({"step": step, **result}))
    trainer.close()


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    _CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Run directory to evaluate (default: config's run_dir).")
    _STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (default: the latest).")
    _SAMPLES = flags.DEFINE_integer("samples", 0, "Samples per prompt, k (default: eval.samples).")
    _PROMPTS = flags.DEFINE_integer("prompts", 0, "Held-out prompts (default: eval.num_prompts).")
    flags.mark_flags_as_required(["config"])
    import sys

    from gtpo_jax.config import exit_on_unknown_overrides

    exit_on_unknown_overrides(sys.argv[1:])
    app.run(main)
