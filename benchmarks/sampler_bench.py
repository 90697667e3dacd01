"""Decode throughput of the KV-cache sampler against full recomputation, in the same run.

Prints one JSON line per model preset: decode tokens/s of `rollout.sampler.sample` (prefill
once, cache copied to G samples, cached decode) and of a baseline that recomputes the whole
sequence for every new token (our own model without a cache, same sampling rule), both jitted,
timed after a warm-up call, median of repeats, and their ratio. Weights are random (throughput
does not depend on them); no stop token, so every row decodes `T` tokens.

    python benchmarks/sampler_bench.py                               # tiny and smollm2_135m
    python benchmarks/sampler_bench.py --tunix_python /path/to/tunix-env/bin/python

With `--tunix_python`, Tunix's sampler (google-tunix, installed in that separate environment
only) runs in a subprocess on the same weights: the random model is exported with `export_hf`
to HF safetensors (plus a tokenizer: SmolLM2's for its vocabulary, a word-level one of the
preset's size otherwise) and loaded by Tunix's own safetensors loader. Tunix's tokenizer adds a
BOS token, so its prompts are one token longer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from gtpo_jax.data.prompts import pad_prompts
from gtpo_jax.models.presets import get_preset
from gtpo_jax.models.sharding import split_model
from gtpo_jax.models.transformer import Transformer
from gtpo_jax.models.weights import export_hf
from gtpo_jax.rollout.sampler import SamplingConfig, sample, sampling_config

BASELINE = "no_cache_recompute"


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


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A tokenizer for Tunix's `AutoTokenizer`: SmolLM2's when the vocabulary is its size,
    else a word-level one with tokens `t0 ... t{V-1}`."""
    if vocab_size == 49152:
        from gtpo_jax.models.gguf import fetch_smollm2

        source = fetch_smollm2()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(source / name, directory / name)
        return
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t1", "eos_token": "t2", "pad_token": "t0"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def run_tunix(python: str, model: Transformer, rows: int, prompt_len: int, T: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tmp)
        write_tokenizer(Path(tmp), model.cfg.vocab_size)
        script = Path(__file__).with_name("tunix_sampler_run.py")
        cmd = [
            python,
            str(script),
            tmp,
            f"--rows={rows}",
            f"--prompt_len={prompt_len}",
            f"--T={T}",
            f"--repeats={repeats}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"tunix_error": done.stderr.strip()[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,smollm2_135m", help="comma-separated model presets")
    parser.add_argument("--P", type=int, default=2, help="prompts")
    parser.add_argument("--G", type=int, default=4, help="responses per prompt")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--T", type=int, default=32, help="new tokens per response")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tunix_python", default="", help="python of an environment with google-tunix")
    args = parser.parse_args()

    cfg = sampling_config(group_size=args.G, max_new_tokens=args.T, temperature=1.0, prompt_buckets=(args.prompt_len,))
    for name in args.presets.split(","):
        model = Transformer(get_preset(name), rngs=nnx.Rngs(0))
        vocab = model.cfg.vocab_size
        prompts = [[(7 * p + 3 * i) % vocab for i in range(args.prompt_len)] for p in range(args.P)]
        tokens, valid = (jnp.asarray(x) for x in pad_prompts(prompts, cfg.rollout.prompt_buckets, 0))
        key = jax.random.key(0)
        model_def, params = split_model(model)
        ours = timed(lambda: sample(model_def, params, tokens, valid, key, cfg).tokens, args.repeats)  # noqa: B023
        base = timed(lambda: sample_without_cache(model, tokens, valid, key, cfg), args.repeats)  # noqa: B023
        decoded = args.P * args.G * args.T
        record = {
            "benchmark": "sampler_decode",
            "preset": name,
            "P": args.P,
            "G": args.G,
            "prompt_len": args.prompt_len,
            "T": args.T,
            "decoded_tokens": decoded,
            "kv_cache_s": ours,
            "kv_cache_tokens_per_s": decoded / ours,
            "baseline": BASELINE,
            "baseline_s": base,
            "baseline_tokens_per_s": decoded / base,
            "speedup_vs_baseline": base / ours,
            "backend": jax.default_backend(),
            "jax": jax.__version__,
        }
        if args.tunix_python:
            record |= run_tunix(args.tunix_python, model, args.P * args.G, args.prompt_len, args.T, args.repeats)
            if "tunix_tokens_per_s" in record:
                record["speedup_vs_tunix"] = record["kv_cache_tokens_per_s"] / record["tunix_tokens_per_s"]
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
