"""Runs Tunix's sampler on a HF checkpoint directory and prints its decode throughput as JSON.

Executed by `sampler_bench.py --tunix_python PYTHON` with the interpreter of an environment
where `google-tunix` is installed (kept apart from ours: it pins other versions). It does not
import gtpo_jax. Llama-architecture checkpoints only (SmolLM2 is one).

    PYTHON benchmarks/tunix_sampler_run.py CKPT_DIR --rows 16 --prompt_len 32 --T 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--rows", type=int, required=True, help="sequences decoded together (P * G)")
    parser.add_argument("--prompt_len", type=int, required=True)
    parser.add_argument("--T", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import transformers
    from tunix.generate import sampler as sampler_lib
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params as llama3_params

    hf = json.loads((Path(args.checkpoint) / "config.json").read_text())
    cfg = llama3.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(hf["rope_theta"]),
        norm_eps=hf["rms_norm_eps"],
        weight_tying=hf["tie_word_embeddings"],
    )
    model = llama3_params.create_model_from_safe_tensors(args.checkpoint, cfg)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.checkpoint)
    # A prompt of exactly prompt_len tokens, the same for every row.
    ids = [(7 * i + 3) % 1000 + 1000 for i in range(args.prompt_len)]
    prompt = tokenizer.decode(ids)

    def make_sampler(cache_size: int):
        config = sampler_lib.CacheConfig(
            cache_size=cache_size, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim
        )
        return sampler_lib.Sampler(model, tokenizer, config)

    # Tunix's own tokenisation (it may add BOS) decides the prompt length; with max_prompt_length
    # set to it, no power-of-two padding happens and the cache holds exactly prompt + T.
    prompt_len = len(make_sampler(4 * args.prompt_len + args.T).tokenize(prompt))
    sampler = make_sampler(prompt_len + args.T)

    def run(seed: int):
        out = sampler(
            [prompt] * args.rows,
            max_generation_steps=args.T,
            max_prompt_length=prompt_len,
            temperature=1.0,
            top_p=1.0,
            eos_tokens=[cfg.vocab_size - 1],  # (almost) never drawn: every row decodes T tokens
            seed=seed,
        )
        return out.tokens

    run(0)  # compile + warm-up
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        tokens = run(i + 1)
        jax.block_until_ready(jax.tree.leaves(tokens))
        times.append(time.perf_counter() - start)
    decoded = sum(len(t) for t in tokens)
    seconds = statistics.median(times)
    print(
        json.dumps(
            {
                "tunix_s": seconds,
                "tunix_decoded_tokens": decoded,
                "tunix_tokens_per_s": decoded / seconds,
                "tunix_prompt_len": prompt_len,
            }
        )
    )


if __name__ == "__main__":
    main()
