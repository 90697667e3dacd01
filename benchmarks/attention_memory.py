"""Compiled temporary memory of dense vs blockwise attention, forward + backward (issue 17).

For each sequence length S, compiles (never runs) `jax.value_and_grad` of
  - "attention": one attention op, loss = sum(out * g), gradients w.r.t. q, k, v, and
  - "layer": a one-layer `Transformer` (hidden 256, 4 query heads / 2 KV heads of 64, vocab 256),
    loss = sum of its final hidden states, gradients w.r.t. every parameter,
with `model.attention` = "dense" and "blockwise", and prints one JSON document: XLA's
`memory_analysis().temp_size_in_bytes` of each and the ratio blockwise / dense. Batch 1,
float32, causal, every key valid. Compile only: seconds per length on a CPU.

    python benchmarks/attention_memory.py                          # S = 1k, 2k, 4k, 8k
    python benchmarks/attention_memory.py --lengths 1024 --block 256
"""

from __future__ import annotations

import argparse
import json

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from gtpo_jax.models.attention import Mask, blockwise_attention, dense_attention
from gtpo_jax.models.transformer import ModelConfig, Transformer

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64


def attention_temp_bytes(kind: str, S: int, block: int) -> int:
    q = jax.ShapeDtypeStruct((1, S, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, S, KV_HEADS, HEAD_DIM), jnp.float32)

    def loss(q, k, v, g):
        mask = Mask(jnp.arange(S), jnp.ones((1, S), bool), jnp.int32(S + 1))
        if kind == "dense":
            out = dense_attention(q, k, v, mask, HEAD_DIM**-0.5)
        else:
            out = blockwise_attention(q, k, v, mask, HEAD_DIM**-0.5, block, block)
        return jnp.sum(out * g)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return fn.lower(q, kv, kv, q).compile().memory_analysis().temp_size_in_bytes


def layer_temp_bytes(kind: str, S: int, block: int) -> int:
    cfg = ModelConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_layers=1,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=S,
        attention=kind,
        attention_block=block,
    )
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

    def loss(params, tokens):
        model = nnx.merge(graphdef, params)
        valid = jnp.ones(tokens.shape, bool)
        hidden, _ = model(tokens, jnp.broadcast_to(jnp.arange(S), tokens.shape), valid)
        return jnp.sum(hidden)

    tokens = jax.ShapeDtypeStruct((1, S), jnp.int32)
    fn = jax.jit(jax.value_and_grad(loss))
    return fn.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--block", type=int, default=512, help="query and key block (model.attention_block)")
    args = parser.parse_args()
    rows = []
    for S in args.lengths:
        row = {"S": S}
        for what, measure in (("attention", attention_temp_bytes), ("layer", layer_temp_bytes)):
            dense, block = measure("dense", S, args.block), measure("blockwise", S, args.block)
            row |= {f"{what}_dense_temp_bytes": dense, f"{what}_blockwise_temp_bytes": block}
            row[f"{what}_ratio"] = round(block / dense, 5)
        rows.append(row)
    setup = {"batch": 1, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block": args.block}
    info = {"backend": jax.default_backend(), "jax": jax.__version__, "dtype": "float32", **setup}
    print(json.dumps({"setup": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
