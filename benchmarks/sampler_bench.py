"""Decode throughput of the KV-cache sampler against full recomputation, in the same run.

Prints one JSON line per model preset: decode tokens/s of `rollout.sampler.sample` (prefill
once, cache copied to G samples, cached decode) and of a baseline that recomputes the whole
sequence for every new token (our own model without a cache, same sampling rule), both jitted,
timed after a warm-up call, median of repeats, and their ratio. Weights are random (throughput
does not depend on them); no stop token, so every row decodes `T` tokens.

    python benchmarks/sampler_bench.py                               # tiny and smollm2_135m
    python benchmarks/sampler_bench.py --presets tiny --T 32

Tunix's sampler is not compared here yet (see the README's sampler section).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from gtpo_jax.models.presets import get_preset
from gtpo_jax.models.transformer import Transformer
from gtpo_jax.rollout.sampler import SamplingConfig, pad_prompts, sample

BASELINE = "no_cache_recompute"


@nnx.jit(static_argnames="cfg")
def sample_without_cache(model: Transformer, prompts, prompt_valid, key, cfg: SamplingConfig):
    """Same draws as `sample` would make at temperature 1, but every step runs the full
    `[B, Lp + T]` forward (right-padded buffer; causal attention never sees the padding)."""
    P, Lp = prompts.shape
    B, T = P * cfg.group_size, cfg.max_new_tokens
    tokens = jnp.repeat(jnp.pad(prompts, ((0, 0), (0, T))), cfg.group_size, axis=0)
    valid = jnp.repeat(jnp.pad(prompt_valid, ((0, 0), (0, T))), cfg.group_size, axis=0)
    positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)

    def step(t, carry):
        tokens, valid, positions = carry
        hidden, _ = model(tokens, positions, valid)
        logits = model.logits(jax.lax.dynamic_slice_in_dim(hidden, Lp + t - 1, 1, axis=1))[:, 0]
        keys = jax.random.split(jax.random.fold_in(key, t), B)
        new = jax.vmap(jax.random.categorical)(keys, logits / cfg.temperature).astype(tokens.dtype)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], Lp + t, axis=1)
        valid = jax.lax.dynamic_update_slice_in_dim(valid, jnp.ones((B, 1), bool), Lp + t, axis=1)
        positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
        return tokens, valid, positions

    tokens, _, _ = jax.lax.fori_loop(0, T, step, (tokens, valid, positions))
    return tokens[:, Lp:]


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,smollm2_135m", help="comma-separated model presets")
    parser.add_argument("--P", type=int, default=4, help="prompts")
    parser.add_argument("--G", type=int, default=4, help="responses per prompt")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--T", type=int, default=64, help="new tokens per response")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = SamplingConfig(group_size=args.G, max_new_tokens=args.T, temperature=1.0, prompt_buckets=(args.prompt_len,))
    for name in args.presets.split(","):
        model = Transformer(get_preset(name), rngs=nnx.Rngs(0))
        vocab = model.cfg.vocab_size
        prompts = [[(7 * p + 3 * i) % vocab for i in range(args.prompt_len)] for p in range(args.P)]
        tokens, valid = (jnp.asarray(x) for x in pad_prompts(prompts, cfg.prompt_buckets, 0))
        key = jax.random.key(0)
        ours = timed(lambda: sample(model, tokens, valid, key, cfg).tokens, args.repeats)  # noqa: B023
        base = timed(lambda: sample_without_cache(model, tokens, valid, key, cfg), args.repeats)  # noqa: B023
        decoded = args.P * args.G * args.T
        print(json.dumps({
            "benchmark": "sampler_decode", "preset": name, "P": args.P, "G": args.G,
            "prompt_len": args.prompt_len, "T": args.T, "decoded_tokens": decoded,
            "kv_cache_s": ours, "kv_cache_tokens_per_s": decoded / ours,
            "baseline": BASELINE, "baseline_s": base, "baseline_tokens_per_s": decoded / base,
            "speedup_vs_baseline": base / ours, "backend": jax.default_backend(), "jax": jax.__version__,
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
