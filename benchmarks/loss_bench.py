"""Cost of advantages + loss + gradient per algorithm, against GRPO in the same run.

Prints one JSON line per algorithm: median wall time of one jitted step (prepare_batch:
reward shaping and advantages; compute_loss; gradient w.r.t. logp) on a `[P, G, T]` batch
after warm-up, tokens/s, the compiled step's memory (XLA's memory analysis), and the ratio of
its time to GRPO's. By default every algorithm runs with the same loss settings (token_mean,
no KL, clip 0.2/0.28) so that the ratio isolates what the algorithm itself adds: its advantage
estimator and its ratio level. `--recipe_defaults` uses each recipe's own defaults instead.

    python benchmarks/loss_bench.py                     # P=32, G=16, T=4096 (the issue's size)
    python benchmarks/loss_bench.py --P 4 --T 512       # quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gtpo_jax.losses import LossConfig, mean_loss, prepare_batch

BASELINE = "grpo"
ALGORITHMS = ("grpo", "dapo", "gtpo", "grpo_s")
SHARED = dict(loss_agg="token_mean", kl_coef=0.0, eps_low=0.2, eps_high=0.28, dynamic_sampling=True)


def make_inputs(P: int, G: int, T: int, seed: int) -> dict[str, jax.Array]:
    """A rollout-like batch: mixed binary rewards, random lengths, entropies and log-ratios."""
    rng = np.random.default_rng(seed)
    rewards = (rng.random((P, G)) < 0.5).astype(np.float32)
    lengths = rng.integers(T // 8, T + 1, size=(P, G))
    mask = (np.arange(T)[None, None, :] < lengths[..., None]).astype(np.float32)
    old_logp = -rng.exponential(1.0, (P, G, T)).astype(np.float32)
    arrays = dict(
        rewards=rewards,
        mask=mask,
        old_logp=old_logp,
        entropy=rng.exponential(1.0, (P, G, T)).astype(np.float32),
        logp=(old_logp + 0.1 * rng.standard_normal((P, G, T))).astype(np.float32),
    )
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def step_fn(cfg: LossConfig):
    def step(rewards, mask, old_logp, entropy, logp):
        batch, _ = prepare_batch(cfg, rewards=rewards, mask=mask, old_logp=old_logp, entropy=entropy)
        return jax.value_and_grad(lambda lp: mean_loss(cfg, lp, batch))(logp)

    return jax.jit(step)


def measure(cfg: LossConfig, inputs: dict[str, jax.Array], warmup: int, repeats: int) -> dict[str, float]:
    step = step_fn(cfg)
    args = tuple(inputs[k] for k in ("rewards", "mask", "old_logp", "entropy", "logp"))
    memory = step.lower(*args).compile().memory_analysis()
    for _ in range(warmup):
        jax.block_until_ready(step(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    out = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
    if memory is not None:
        out["temp_bytes"] = int(memory.temp_size_in_bytes)
        out["peak_bytes"] = int(memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--P", type=int, default=32, help="prompts")
    parser.add_argument("--G", type=int, default=16, help="responses per prompt")
    parser.add_argument("--T", type=int, default=4096, help="response tokens (padded)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls; the median is reported")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the algorithms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe_defaults", action="store_true", help="each recipe's own loss settings")
    args = parser.parse_args()

    inputs = make_inputs(args.P, args.G, args.T, args.seed)
    tokens = float(jnp.sum(inputs["mask"]))
    configs = {
        a: LossConfig(algorithm=a, group_size=args.G, **({} if args.recipe_defaults else SHARED)) for a in ALGORITHMS
    }
    # Interleave the algorithms over several rounds, so that a slow spell of the machine
    # hits all of them alike; keep each algorithm's best round (lowest median).
    results: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for name, cfg in configs.items():
            r = measure(cfg, inputs, args.warmup, args.repeats)
            if name not in results or r["median_s"] < results[name]["median_s"]:
                results[name] = r
    base = results[BASELINE]
    for name in ALGORITHMS:
        r = results[name]
        record = {
            "benchmark": "loss_advantages_loss_grad",
            "algorithm": name,
            "P": args.P,
            "G": args.G,
            "T": args.T,
            "valid_tokens": int(tokens),
            **r,
            "tokens_per_s": tokens / r["median_s"],
            "baseline": BASELINE,
            "ratio_to_baseline": r["median_s"] / base["median_s"],
            # The minimum is the least disturbed by other load on a shared machine.
            "ratio_to_baseline_min": r["min_s"] / base["min_s"],
            "loss_settings": "recipe_defaults" if args.recipe_defaults else SHARED,
            "device": str(jax.devices()[0].device_kind),
            "backend": jax.default_backend(),
            "jax": jax.__version__,
            "host": platform.machine(),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
