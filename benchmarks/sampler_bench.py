"""Decode throughput of the KV-cache sampler against full recomputation and Tunix's sampler.

Prints one JSON line per workload: decode tokens/s of `rollout.sampler.sample` (prefill once,
cache copied to G samples, cached decode), timed after a warm-up call, median of repeats, with
the tokens brought to the host (as Tunix's API returns them); optionally of a baseline that
recomputes the whole sequence for every new token (our own model without a cache, same sampling
rule); and with `--tunix_python`, of Tunix's sampler on the same weights. Weights are random
(throughput does not depend on them).

    python benchmarks/sampler_bench.py                                  # tiny and smollm2_135m, P x G x T
    python benchmarks/sampler_bench.py --workloads=issue18 --skip_baseline --repeats=3 \\
        --tunix_python /path/to/tunix-env/bin/python

Workloads: `--workloads=preset:ROWSxT,...` (rows = P x G with G = `--G`), or `issue18` for the
three of issue 18: `tiny` 8 x 128, SmolLM2-135M shape 8 x 128 and 64 x 256, 32-token prompts.
Without `--workloads`, each of `--presets` runs at `--P` x `--G` x `--T`.

The same work on both sides, checked (`fairness`): Tunix's sampler (google-tunix, installed in
that separate environment only) runs in a subprocess on the random model exported with
`export_hf` to HF safetensors and loaded by Tunix's own loader. It gets the very prompt token
ids our sampler decodes from, through a tokenizer that passes ids through (`tunix_common.py`:
Tunix's HF tokenizer would add a BOS token); neither side has a stop token, so every row decodes
`T` tokens. Each side reports the prompt token matrix it decoded from (length and fingerprint)
and the tokens it actually produced; a row whose two sides differ in any of them is
`"valid": false` and carries no `speedup_vs_tunix` (= our tokens/s over Tunix's). Tunix's time
includes its host-side string handling (cheap here: ids as words) and it computes no log-probs
of the sampled tokens (ours does, for the loss): both favour Tunix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from gtpo_jax.data.prompts import pad_prompts
from gtpo_jax.models.presets import get_preset
from gtpo_jax.models.sharding import split_model
from gtpo_jax.models.transformer import Transformer
from gtpo_jax.models.weights import export_hf
from gtpo_jax.rollout.sampler import SamplingConfig, sample, sampling_config

BASELINE = "no_cache_recompute"
PAD_ID = 0  # left padding on both sides; no prompt token equals it (Tunix finds padding by value)
# Issue 18's three workloads: (preset, rows = P x G, new tokens T).
ISSUE18 = "tiny:8x128,smollm2_135m:8x128,smollm2_135m:64x256"
# What both sides must agree on before a ratio is taken: (our field, Tunix's field).
SAME_WORK = (
    ("prompt_len", "tunix_prompt_len"),
    ("prompt_sha", "tunix_prompt_sha"),
    ("decoded_tokens", "tunix_decoded_tokens"),
)


@nnx.jit(static_argnames="cfg")
def sample_without_cache(model: Transformer, prompts, prompt_valid, key, cfg: SamplingConfig):
    """Same draws as `sample` would make at temperature 1, but every step runs the full
    `[B, Lp + T]` forward (right-padded buffer; causal attention never sees the padding)."""
    P, Lp = prompts.shape
    B, T = P * cfg.group_size, cfg.rollout.max_new_tokens
    tokens = jnp.repeat(jnp.pad(prompts, ((0, 0), (0, T))), cfg.group_size, axis=0)
    valid = jnp.repeat(jnp.pad(prompt_valid, ((0, 0), (0, T))), cfg.group_size, axis=0)
    positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)

    def step(t, carry):
        tokens, valid, positions = carry
        hidden, _ = model(tokens, positions, valid)
        logits = model.logits(jax.lax.dynamic_slice_in_dim(hidden, Lp + t - 1, 1, axis=1))[:, 0]
        keys = jax.random.split(jax.random.fold_in(key, t), B)
        new = jax.vmap(jax.random.categorical)(keys, logits / cfg.rollout.temperature).astype(tokens.dtype)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], Lp + t, axis=1)
        valid = jax.lax.dynamic_update_slice_in_dim(valid, jnp.ones((B, 1), bool), Lp + t, axis=1)
        positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
        return tokens, valid, positions

    tokens, _, _ = jax.lax.fori_loop(0, T, step, (tokens, valid, positions))
    return tokens[:, Lp:]


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls after a warm-up (compiling) call, and the last result."""
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def prompt_ids(P: int, prompt_len: int, vocab: int) -> list[list[int]]:
    """P distinct prompts of `prompt_len` ids, none equal to `PAD_ID`."""
    return [[1 + (7 * p + 3 * i) % (vocab - 2) for i in range(prompt_len)] for p in range(P)]


def prompt_sha(rows) -> str:
    """Fingerprint of the `[rows, Lp]` prompt token matrix a sampler decodes from (the same
    function as `tunix_common.prompt_sha`)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(rows, np.int32)).tobytes()).hexdigest()[:16]


def parse_workloads(spec: str, G: int) -> list[tuple[str, int, int]]:
    """`"preset:ROWSxT,..."` (or `issue18`) -> `[(preset, P, T)]`, rows a multiple of `G`."""
    out = []
    for item in (ISSUE18 if spec == "issue18" else spec).split(","):
        preset, shape = item.split(":")
        rows, T = (int(x) for x in shape.lower().split("x"))
        if rows % G:
            raise ValueError(f"--workloads={spec}: {rows} rows is not a multiple of --G={G}")
        out.append((preset, rows // G, T))
    return out


def fairness(record: dict) -> dict:
    """`valid` (and `speedup_vs_tunix`, our tokens/s over Tunix's) when both sides decoded from the
    same prompt tokens and produced the same number of tokens; else `valid: false` and the reasons."""
    if "tunix_tokens_per_s" not in record:
        return {"valid": False, "invalid_reasons": ["no Tunix measurement"]}
    reasons = [
        f"{ours}={record.get(ours)!r} but {theirs}={record.get(theirs)!r}"
        for ours, theirs in SAME_WORK
        if record.get(ours) is None or record.get(ours) != record.get(theirs)
    ]
    if reasons:
        return {"valid": False, "invalid_reasons": reasons}
    return {"valid": True, "speedup_vs_tunix": record["kv_cache_tokens_per_s"] / record["tunix_tokens_per_s"]}


def run_tunix(python: str, model: Transformer, rows: list[list[int]], T: int, repeats: int) -> dict:
    """Tunix's sampler on `model` (exported to HF safetensors) and the rows' prompt ids."""
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tmp)
        (Path(tmp) / "prompts.json").write_text(json.dumps(rows))
        script = Path(__file__).with_name("tunix_sampler_run.py")
        cmd = [python, str(script), tmp, f"--prompts={tmp}/prompts.json", f"--T={T}", f"--pad_id={PAD_ID}"]
        done = subprocess.run([*cmd, f"--repeats={repeats}"], capture_output=True, text=True)
    if done.returncode != 0:
        return {"tunix_error": done.stderr.strip()[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(name: str, P: int, G: int, prompt_len: int, T: int, args) -> dict:
    """One workload's JSON record (see the module docstring)."""
    cfg = sampling_config(group_size=G, max_new_tokens=T, temperature=1.0, prompt_buckets=(prompt_len,), pad_id=PAD_ID)
    model = Transformer(get_preset(name), rngs=nnx.Rngs(0))
    ids = prompt_ids(P, prompt_len, model.cfg.vocab_size)
    tokens, valid = (jnp.asarray(x) for x in pad_prompts(ids, cfg.rollout.prompt_buckets, PAD_ID))
    key = jax.random.key(0)
    model_def, params = split_model(model)

    def ours():  # the tokens and lengths to the host, as Tunix's API returns them
        out = sample(model_def, params, tokens, valid, key, cfg)
        return jax.device_get((out.tokens, out.lengths))

    seconds, (_, lengths) = timed(ours, args.repeats)
    rows = np.repeat(np.asarray(tokens), G, axis=0)  # row p * G + g decodes prompt p
    decoded = int(np.sum(lengths))
    record = {
        "benchmark": "sampler_decode",
        "preset": name,
        "rows": P * G,
        "P": P,
        "G": G,
        "prompt_len": int(np.asarray(valid).sum(axis=1).max()),
        "prompt_sha": prompt_sha(rows),
        "T": T,
        "decoded_tokens": decoded,
        "kv_cache_s": seconds,
        "kv_cache_tokens_per_s": decoded / seconds,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
    }
    if not args.skip_baseline:
        base, _ = timed(lambda: sample_without_cache(model, tokens, valid, key, cfg), args.repeats)
        record |= {
            "baseline": BASELINE,
            "baseline_s": base,
            "baseline_tokens_per_s": P * G * T / base,
            "speedup_vs_baseline": base / seconds,
        }
    if args.tunix_python:
        record |= run_tunix(args.tunix_python, model, rows.tolist(), T, args.repeats)
        record |= fairness(record)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,smollm2_135m", help="comma-separated model presets")
    parser.add_argument(
        "--workloads", default="", help="'preset:ROWSxT,...' or 'issue18' (overrides --presets/--P/--T)"
    )
    parser.add_argument("--P", type=int, default=2, help="prompts")
    parser.add_argument("--G", type=int, default=4, help="responses per prompt")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--T", type=int, default=32, help="new tokens per response")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip_baseline", action="store_true", help="skip the no-cache recompute baseline")
    parser.add_argument("--tunix_python", default="", help="python of an environment with google-tunix")
    args = parser.parse_args()

    if args.workloads:
        workloads = parse_workloads(args.workloads, args.G)
    else:
        workloads = [(name, args.P, args.T) for name in args.presets.split(",")]
    for name, P, T in workloads:
        print(json.dumps(measure(name, P, args.G, args.prompt_len, T, args)), flush=True)


if __name__ == "__main__":
    main()
