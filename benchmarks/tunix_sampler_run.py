"""Runs Tunix's sampler on a HF checkpoint directory and prints its decode throughput as JSON.

Executed by `sampler_bench.py --tunix_python PYTHON` with the interpreter of an environment
where `google-tunix` is installed (kept apart from ours: it pins other versions). It does not
import gtpo_jax. Llama-architecture checkpoints only (SmolLM2 is one).

    PYTHON benchmarks/tunix_sampler_run.py CKPT_DIR --prompts PROMPTS.json --T 64 --pad_id 0

`PROMPTS.json` holds the rows' prompt token ids (one list per decoded row, as our sampler
decodes them). They reach Tunix's sampler unchanged through `tunix_common.IdsTokenizer` (no BOS
added, no end-of-sequence token), and the runner reports what Tunix actually did: the prompt
token matrix it decoded from (`tunix_prompt_len`, `tunix_prompt_sha`) and the tokens it
returned (`tunix_decoded_tokens`), which `sampler_bench.py` checks against its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
from tunix_common import IdsTokenizer, as_text, load_llama, prompt_sha


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--prompts", required=True, help="JSON file: one list of prompt token ids per row")
    parser.add_argument("--T", type=int, required=True, help="new tokens per row")
    parser.add_argument("--pad_id", type=int, default=0, help="left-padding id (no prompt token may equal it)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from tunix.generate import sampler as sampler_lib

    rows = json.loads(Path(args.prompts).read_text())
    if any(args.pad_id in r for r in rows):
        raise SystemExit(f"a prompt holds the pad id {args.pad_id}: Tunix would read it as padding")
    model, cfg = load_llama(args.checkpoint)
    prompt_len = max(len(r) for r in rows)
    # With max_prompt_length = the prompts' length no power-of-two padding happens, and the
    # cache holds exactly prompt + T (as ours: Lp + T slots).
    cache = sampler_lib.CacheConfig(
        cache_size=prompt_len + args.T, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim
    )
    sampler = sampler_lib.Sampler(model, IdsTokenizer(args.pad_id), cache)
    prompts = [as_text(r) for r in rows]

    def run(seed: int):
        return sampler(
            prompts,
            max_generation_steps=args.T,
            max_prompt_length=prompt_len,
            temperature=1.0,
            top_p=1.0,  # top-p mode with p = 1 and no top-k: a plain categorical draw, as ours
            seed=seed,
        )

    run(0)  # compile + warm-up
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        out = run(i + 1)
        jax.block_until_ready(jax.tree.leaves(out.tokens))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    decoded = sum(len(t) for t in out.tokens)
    padded = out.padded_prompt_tokens
    print(
        json.dumps(
            {
                "tunix_s": seconds,
                "tunix_times_s": [round(t, 4) for t in times],
                "tunix_decoded_tokens": decoded,
                "tunix_tokens_per_s": decoded / seconds,
                "tunix_prompt_len": int((padded[0] != args.pad_id).sum()),
                "tunix_prompt_width": int(padded.shape[1]),
                "tunix_prompt_sha": prompt_sha(padded),
                "tunix_jax": jax.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
