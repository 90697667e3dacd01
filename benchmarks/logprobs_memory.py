"""Memory and time of value-and-grad of the chunked log-prob/entropy op vs the dense one.

Prints one JSON line: XLA's compiled temporary memory (`memory_analysis().temp_size_in_bytes`)
of `jax.value_and_grad` of a loss using both outputs (log-probs and entropy) w.r.t. the hidden
states and the unembedding, for `ops/logprobs.py` and for the dense reference
(`[B*T, V]` float32 logits, log_softmax, -sum p log p), their ratio, and wall times of the
compiled functions after one warm-up call. Defaults are Qwen2.5-0.5B sizes.

    python benchmarks/logprobs_memory.py                       # B=4 T=2048 d=896 V=151936
    python benchmarks/logprobs_memory.py --memory_only         # compile only (seconds)
    python benchmarks/logprobs_memory.py --T 256 --V 32000     # quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from gtpo_jax.ops.logprobs import dense_logprobs_and_entropy, token_logprobs_and_entropy

BASELINE = "dense"


def loss_fn(op, targets, g_logp, g_ent):
    def loss(h, w):
        logp, ent = op(h, w, targets)
        return jnp.sum(logp * g_logp) + jnp.sum(ent * g_ent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=4, help="sequences")
    parser.add_argument("--T", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--d", type=int, default=896, help="hidden size")
    parser.add_argument("--V", type=int, default=151936, help="vocabulary size")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--token_chunk", type=int, default=1024)
    parser.add_argument("--vocab_chunk", type=int, default=16384)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="hidden/unembedding dtype")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after one warm-up (median reported)")
    parser.add_argument("--memory_only", action="store_true", help="compile and report memory, do not run")
    args = parser.parse_args()

    N = args.B * args.T
    k = jax.random.split(jax.random.key(0), 5)
    dtype = jnp.dtype(args.dtype)
    h = jax.random.normal(k[0], (N, args.d), jnp.float32).astype(dtype)
    w = (jax.random.normal(k[1], (args.d, args.V), jnp.float32) * args.d**-0.5).astype(dtype)
    y = jax.random.randint(k[2], (N,), 0, args.V)
    g_logp, g_ent = jax.random.normal(k[3], (N,)), jax.random.normal(k[4], (N,))

    ops = {
        "chunked": lambda h, w, y: token_logprobs_and_entropy(
            h, w, y, temperature=args.temperature, token_chunk=args.token_chunk, vocab_chunk=args.vocab_chunk
        ),
        "dense": lambda h, w, y: dense_logprobs_and_entropy(h, w, y, temperature=args.temperature),
    }
    record: dict = {
        "benchmark": "logprobs_entropy_value_and_grad",
        "B": args.B,
        "T": args.T,
        "d": args.d,
        "V": args.V,
        "dtype": args.dtype,
        "token_chunk": args.token_chunk,
        "vocab_chunk": args.vocab_chunk,
        "baseline": BASELINE,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
    }
    compiled = {}
    for name, op in ops.items():
        start = time.perf_counter()
        compiled[name] = loss_fn(op, y, g_logp, g_ent).lower(h, w).compile()
        record[f"{name}_compile_s"] = time.perf_counter() - start
        mem = compiled[name].memory_analysis()
        record[f"{name}_temp_bytes"] = int(mem.temp_size_in_bytes)
    record["temp_memory_ratio"] = record["chunked_temp_bytes"] / record["dense_temp_bytes"]
    record["dense_logits_bytes"] = N * args.V * 4
    if not args.memory_only:
        for name, fn in compiled.items():
            jax.block_until_ready(fn(h, w))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(h, w))
                times.append(time.perf_counter() - start)
            record[f"{name}_s"] = statistics.median(times)
        record["time_ratio"] = record["chunked_s"] / record["dense_s"]
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
