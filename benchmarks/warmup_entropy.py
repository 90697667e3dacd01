"""Per-token entropy of the comparison grid's warmed-up policies: where along a response the
policy is uncertain (issue 13, point 1: "per-token entropy that varies along a response, report
its distribution").

    python benchmarks/warmup_entropy.py --config=configs/compare_cot.py \\
        > benchmarks/results/compare_cot_warmup_entropy.json

For each seed of `compare.seeds`, the seed's saved warm-up (`<train.run_dir>/warmup/seed<s>`, as
`python -m gtpo_jax.compare` leaves it; trained and saved the same way if missing), then
`--prompts` held-out prompts x G samples at the rollout temperature, and the policy's entropy at
every response token (the scoring pass's, `scoring.score`). One JSON line per seed: the entropy's
quantiles and mean over response tokens, the mean over responses of its standard deviation along
the response (`within_response_std`: 0 if every token of a response were equally uncertain),
the mean entropy by position in the response, the mean response length and the sampled accuracy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS  # defined when run as a script (`_define_flags`): tests import the statistics

QUANTILES = (10, 25, 50, 75, 90, 99)


def entropy_stats(entropy: np.ndarray, mask: np.ndarray) -> dict[str, float | list[float]]:
    """Distribution of `entropy` `[N, T]` over the tokens where `mask`, and along responses."""
    tokens = entropy[mask]
    lengths = mask.sum(-1)
    if not mask.any():
        raise ValueError("no response tokens: every sampled response is empty")
    rows = [entropy[i, : lengths[i]] for i in range(len(lengths)) if lengths[i] > 0]  # a 1-token one: std 0
    by_position = [float(entropy[mask[:, t], t].mean()) for t in range(mask.shape[1]) if mask[:, t].any()]
    return {
        **{f"p{q}": float(np.percentile(tokens, q)) for q in QUANTILES},
        "mean": float(tokens.mean()),
        "within_response_std": float(np.mean([r.std() for r in rows])),
        "mean_by_position": [round(x, 4) for x in by_position],
        "tokens": int(mask.sum()),
    }


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.DEFINE_integer("prompts", 64, "Held-out prompts per seed (each sampled G times).")


def seed_record(values: dict, seed: int, prompts: int) -> dict:
    """The JSON record of one seed's warm-up (see the module docstring)."""
    from gtpo_jax.config import from_dict
    from gtpo_jax.scoring import score
    from gtpo_jax.training.build import build, load_data, reward_pool
    from gtpo_jax.training.collect import draw
    from gtpo_jax.training.grid import run_config, warm_start

    base = from_dict(values)
    cfg = run_config(values, "dapo", seed)  # the warm-up depends on no loss field
    params = warm_start(cfg, base.warmup.steps, Path(base.train.run_dir) / "warmup" / f"seed{seed}", print_err)
    run = build(cfg, train=False)
    records = load_data(cfg, run.encode)[1][:prompts]
    pool, t = reward_pool(cfg, [], records), cfg.rollout.temperature
    try:
        with jax.set_mesh(run.mesh):
            batch = draw(run, params, pool, records, jax.random.key(seed))
            r = batch.rollout
            policy = lambda p: score(  # noqa: E731
                run.model.merge(p), batch.prompts, batch.prompt_valid, r.tokens, r.mask, temperature=t
            )
            _, entropy = jax.jit(policy)(params)
    finally:
        pool.close()
    mask = np.asarray(r.mask).reshape(-1, r.mask.shape[-1])
    return {
        "seed": seed,
        "warmup_steps": base.warmup.steps,
        "prompts": len(records),
        "samples_per_prompt": cfg.loss.group_size,
        "temperature": t,
        "mean_response_tokens": float(batch.lengths.mean()),
        "sampled_accuracy": float(((batch.rewards > cfg.loss.success_threshold) & batch.valid).mean()),
        "entropy": entropy_stats(np.asarray(entropy, np.float32).reshape(mask.shape), mask),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    values = FLAGS.config.to_dict()
    for seed in values["compare"]["seeds"]:
        print(json.dumps(seed_record(values, seed, FLAGS.prompts)), flush=True)


def print_err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
