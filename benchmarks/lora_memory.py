"""Optimizer-state bytes of a LoRA run vs a full run, for the SmolLM2-135M shape (no weights needed).

Prints one JSON object: the AdamW state (`training/state.py make_optimizer`, as a run builds it:
global-norm clipping + AdamW's two moments) of `init_state` traced under `jax.eval_shape` on the
abstract parameters of the `smollm2_135m` preset, for full training and for LoRA at each rank
(`model.lora_targets`: all seven projections, and q, v only), each as a fraction of the full
run's. Also the trainable and total parameter counts. Nothing of the model's size is allocated.

    python benchmarks/lora_memory.py                       # ranks 8 16 32 64, smollm2_135m
    python benchmarks/lora_memory.py --preset qwen2_5_0_5b --ranks 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import flax.nnx as nnx
import jax

from gtpo_jax.config_sections import OptimSection
from gtpo_jax.models.lora import split_trainable
from gtpo_jax.models.presets import get_preset
from gtpo_jax.models.sharding import abstract_model
from gtpo_jax.models.transformer import LORA_TARGETS
from gtpo_jax.training.state import init_state, make_optimizer

BASELINE = "full"
HEADLINE = (8, "all")  # the rank and targets the acceptance figure (<= 3%) is quoted at


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(cfg) -> dict[str, int]:
    """Optimizer-state bytes and parameter counts of a run of `cfg`, traced on abstract arrays."""
    params = nnx.to_pure_dict(abstract_model(cfg)[1])
    optimizer = make_optimizer(OptimSection(), total_steps=100)
    state = jax.eval_shape(lambda p: init_state(p, optimizer, 0), params)
    trainable = split_trainable(params)[0]
    return {
        "opt_state_bytes": nbytes(state.opt_state),
        "trainable_params": sum(x.size for x in jax.tree.leaves(trainable)),
        "params": sum(x.size for x in jax.tree.leaves(params)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2_135m")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    args = parser.parse_args()
    base = get_preset(args.preset)
    full = measure(base)
    runs = {}
    for targets_name, targets in (("all", LORA_TARGETS), ("qv", ("q", "v"))):
        for r in args.ranks:
            m = measure(dataclasses.replace(base, lora_rank=r, lora_targets=targets))
            m["ratio_vs_full"] = round(m["opt_state_bytes"] / full["opt_state_bytes"], 5)
            runs[f"lora_r{r}_{targets_name}"] = m
    headline = runs.get(f"lora_r{HEADLINE[0]}_{HEADLINE[1]}")
    result = {
        "benchmark": "lora_memory",
        "preset": args.preset,
        "optimizer": "clip_by_global_norm + adamw (mu, nu in the parameter dtype: float32)",
        "baseline": BASELINE,
        BASELINE: full,
        **runs,
        "headline": {
            "run": f"lora_r{HEADLINE[0]}_{HEADLINE[1]}",
            "ratio_vs_full": headline and headline["ratio_vs_full"],
        },
        "within_3_percent": bool(headline and headline["ratio_vs_full"] <= 0.03),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
