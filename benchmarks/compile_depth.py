"""Compile time of the scoring pass against depth: a 28-layer, small-width model.

Prints one JSON line: the seconds `jax.jit(score).lower(...).compile()` takes (split into
tracing/lowering and XLA compilation) for the forward
scoring pass (`gtpo_jax/scoring.py`), minimum over `--repeats`, and for its gradient (what the trainer's update
compiles), the number of layers, and a fingerprint of the log-probs (sum, and the first few
values) so that two runs on different code can be checked to compute the same numbers.

The weights do not depend on how the model stores its layers: they are drawn with NumPy in
the Hugging Face layout (one tensor per layer, sorted by name) and loaded with `load_hf`, so a
run before and after a change of the parameter tree scores with identical weights.

    python benchmarks/compile_depth.py --label before > benchmarks/results/compile_depth_before.json
    python benchmarks/compile_depth.py --label scan --layers 7 > benchmarks/results/compile_depth_scan_L7.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from gtpo_jax.models.safetensors_io import save_checkpoint
from gtpo_jax.models.transformer import ModelConfig, Transformer
from gtpo_jax.models.weights import config_to_hf, hf_tensors, load_hf
from gtpo_jax.scoring import score


def deterministic_model(cfg: ModelConfig, directory: Path) -> Transformer:
    """A model whose weights depend only on `cfg` and the HF tensor names (NumPy seed 0)."""
    shapes = {name: arr.shape for name, arr in hf_tensors(Transformer(cfg, rngs=nnx.Rngs(0)))}
    rng = np.random.default_rng(0)
    tensors = {name: (rng.standard_normal(shapes[name]) * 0.05).astype(np.float32) for name in sorted(shapes)}
    save_checkpoint(tensors, directory)
    (directory / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    return load_hf(directory)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3, help="the minimum over repeats is reported (shared CPUs)")
    args = parser.parse_args()
    cfg = ModelConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=args.layers, num_heads=4, num_kv_heads=2
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = deterministic_model(cfg, Path(tmp))
    P, G, Lp, T = 2, 2, 16, 16
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (P, Lp)), jnp.int32)
    prompt_valid = jnp.asarray(np.arange(Lp)[None, :] >= np.array([[3], [0]]))
    responses = jnp.asarray(rng.integers(0, cfg.vocab_size, (P, G, T)), jnp.int32)
    mask = jnp.ones((P, G, T), jnp.float32)
    graphdef, state = nnx.split(model)

    def forward(state, *batch):
        return score(nnx.merge(graphdef, state), *batch)

    def loss(state, *batch):
        logp, _ = forward(state, *batch)
        return jnp.sum(logp)

    batch = (prompts, prompt_valid, responses, mask)
    out: dict = {"label": args.label, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size}
    for name, fn in (("score_forward", forward), ("score_grad", jax.grad(loss))):
        times = []
        for _ in range(args.repeats):
            jax.clear_caches()
            start = time.perf_counter()
            lowered = jax.jit(fn).lower(state, *batch)
            traced = time.perf_counter()
            compiled = lowered.compile()
            times.append((traced - start, time.perf_counter() - traced))
        out[f"{name}_trace_s"] = round(min(t for t, _ in times), 3)
        out[f"{name}_xla_s"] = round(min(x for _, x in times), 3)
        out[f"{name}_compile_s"] = round(min(t + x for t, x in times), 3)  # trace + XLA compile
        if name == "score_forward":
            logp, _ = compiled(state, *batch)
            logp = np.asarray(logp)
            out["logp_sum"] = float(logp.sum())
            out["logp_first"] = [float(x) for x in logp.reshape(-1)[:4]]
    out["jax"] = jax.__version__
    out["device"] = jax.devices()[0].device_kind
    print(json.dumps(out))


if __name__ == "__main__":
    main()
