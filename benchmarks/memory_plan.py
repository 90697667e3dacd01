"""Per-device memory plan of one RL step of a config, compiled ahead of time on a fake mesh.

    python benchmarks/memory_plan.py --config=configs/qwen2_5_7b_dapo_math.py --devices=16 --hbm_gib=95
    python benchmarks/memory_plan.py --config=configs/qwen2_5_7b_dapo_math.py --devices=16 --hbm_gib=16 \\
        --peak_tflops=197 --hbm_gbps=819 --config.mesh.fsdp=-1                          # a v5e-16

Nothing of the model's size is allocated: the parameters, the optimizer state and the batches
are `jax.ShapeDtypeStruct`s carrying their `NamedSharding`s on a mesh of `--devices` CPU devices
(`--xla_force_host_platform_device_count`, set here before jax is imported), laid out by the
config's `mesh` section. The four phases of a step are lowered and compiled with the functions
the trainer itself calls (docs/architecture.md, "one RL step"):

- `rollout`: `rollout/sampler.py sample` on one sampler call: `rollout_prompts` prompts padded to
  the largest prompt bucket, `G` responses each, `max_new_tokens` decode steps;
- `score`: `StepFns.score` (`training/update.py`) on the step's `prompts_per_step` groups, in
  micro-batches of `train.micro_batch_size` sequences;
- `prepare`: `StepFns.prepare` on the step's groups (reward shaping, GTPO's entropy weights, the
  loss batch; its outputs split by rows like the scoring pass's);
- `update`: `StepFns.update` on one mini-batch (`StepFns.take`'s prompts), gradient accumulation
  over its micro-batches of `train.micro_batch_size` sequences included. The scoring pass and the
  update pad a micro-batch to a multiple of the mesh's batch width (`padded_micro_rows`).

Each phase prints one JSON line: XLA's `memory_analysis()` of the compiled, SPMD-partitioned
program, per device: `argument_bytes` (inputs: parameters, state, batch shards), `output_bytes`,
`temp_bytes` (XLA's scratch buffers: activations, KV cache copies, gathered weights),
`alias_bytes` (outputs that reuse an input buffer: the update donates its state), and
`per_device_bytes = argument_bytes + output_bytes - alias_bytes + temp_bytes`, the program's
bytes live at once in the worst case. `resident` names what else stays on the device during the
phase (AdamW's state while sampling and scoring, the step's rollout and loss batch, a KL
reference; `resident` below), `resident_bytes` is their sum, and `fits` is `per_device_bytes +
resident_bytes <= --hbm_gib` (`peak_gib`). These are the CPU compiler's buffer assignments: the TPU compiler fuses and
lays out differently (padding to (8, 128) tiles, its own rematerialisation), so treat the figure as
an estimate to be checked with the real chip's `memory_analysis()`, with headroom.

FLOPs: `xla_flops` is XLA's `cost_analysis()["flops"]` of the per-device program, and XLA counts
the body of a while loop ONCE: the decode loop (`max_new_tokens` steps), the layer scan
(`num_layers` iterations), the micro-batch scan and the attention block loops all run many times
more than counted. So `xla_flops` is NOT the work of the phase; `analytic_flops` is (whole mesh):
`2 x matmul parameters x tokens` (plus the unembedding on the tokens that are scored or sampled)
plus causal attention `4 x layers x heads x head_dim x context` per token, over the rows the
policy runs on (masked padding rows of the micro-batches included); the backward pass is twice
the forward, and rematerialisation adds one forward. `predicted_seconds` is
`analytic_flops / (devices x peak_tflops x mfu)` for the calls a step makes (sampler chunks,
one scoring pass, `ppo_epochs x mini_batches` updates), assuming every response runs to
`max_new_tokens`. Decoding is rarely compute-bound: `decode_bandwidth_seconds` is the time to read
each device's sampler arguments (its parameter shards and KV cache) once per decode step at
`--hbm_gbps`; with the parameters split over `fsdp` each step also gathers them over the ICI.
"""

from __future__ import annotations

import os
import sys


def _force_devices(argv: list[str]) -> None:
    """`--devices=N`: N fake CPU devices; must happen before jax is imported."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--devices=") else argv[i + 1] if arg == "--devices" else None
        if value is not None:
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(value)}".strip()
            os.environ.setdefault("JAX_PLATFORMS", "cpu")


_force_devices(sys.argv[1:])

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import flax.nnx as nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gtpo_jax.config import Config, from_config_dict  # noqa: E402
from gtpo_jax.models import presets  # noqa: E402
from gtpo_jax.models.lora import split_trainable  # noqa: E402
from gtpo_jax.models.sharding import ModelDef, batch_width, param_shardings, rows_sharding  # noqa: E402
from gtpo_jax.models.transformer import ModelConfig  # noqa: E402
from gtpo_jax.parallel.mesh import mesh_from_config  # noqa: E402
from gtpo_jax.rollout.sampler import Rollout, SamplingConfig, sample  # noqa: E402
from gtpo_jax.training.build import model_overrides, run_optimizer  # noqa: E402
from gtpo_jax.training.state import TrainState  # noqa: E402
from gtpo_jax.training.update import Groups, micro_rows, step_fns  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.mark_flags_as_required(["config"])
_DEVICES = flags.DEFINE_integer("devices", 0, "Fake CPU devices of the mesh (0: the devices jax finds).")
_HBM = flags.DEFINE_float("hbm_gib", 95.0, "HBM per device in GiB (v5p: 95, v5e: 16, H100: 80).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation the predicted times assume.")
_PEAK = flags.DEFINE_float("peak_tflops", 459.0, "Peak bf16 TFLOP/s per device (v5p: 459, v5e: 197).")
_HBM_GBPS = flags.DEFINE_float("hbm_gbps", 2765.0, "HBM bandwidth per device in GB/s (v5p: 2765, v5e: 819).")
_ROLLOUT_ROWS = flags.DEFINE_integer(
    "rollout_batch_size", -1, "Sequences per sampler call (-1: the config's rollout.batch_size if set, else all)."
)
_PHASES = flags.DEFINE_list("phases", ["rollout", "score", "prepare", "update"], "Phases to compile.")

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes of each phase's call, from the config (one place, so new config fields go here)."""

    group_size: int  # G
    prompt_len: int  # Lp: the largest prompt bucket
    response_len: int  # T
    rollout_prompts: int  # prompts per sampler call
    rollout_calls: int  # sampler calls per step (no dynamic-sampling refills counted)
    score_prompts: int  # prompts of the scoring call (the whole step)
    update_calls: int  # optimiser updates per step
    micro_rows: int  # sequences per micro-batch of the scoring pass and the update
    batch_width: int  # devices a micro-batch's rows are split over (padded to a multiple of it)


def phase_shapes(cfg: Config, mesh: Mesh, rollout_rows: int = -1) -> Shapes:
    """Per-phase shapes of `cfg`; `rollout_rows` sequences per sampler call (-1: the config's
    `rollout.batch_size` when the section has it, 0 = all the step's sequences)."""
    t, G = cfg.train, cfg.loss.group_size
    if rollout_rows < 0:
        rollout_rows = getattr(cfg.rollout, "batch_size", 0)
    sequences = t.prompts_per_step * G
    rows = rollout_rows or sequences
    if rows % G or sequences % rows:
        raise ValueError(f"{rows} sequences per sampler call must be whole groups of {G} dividing {sequences}")
    return Shapes(
        group_size=G,
        prompt_len=max(cfg.rollout.prompt_buckets),
        response_len=cfg.rollout.max_new_tokens,
        rollout_prompts=rows // G,
        rollout_calls=sequences // rows,
        score_prompts=t.prompts_per_step,
        update_calls=t.ppo_epochs * t.mini_batches,
        micro_rows=micro_rows(cfg),
        batch_width=batch_width(mesh),
    )


def model_config(cfg: Config) -> ModelConfig:
    """The model the run would build: the preset's architecture with the model section's switches
    (`training/build.py` reads the checkpoint's config.json instead; the presets mirror them)."""
    m = cfg.model
    lora = dict(
        lora_rank=m.lora_rank, lora_alpha=m.lora_alpha, lora_targets=m.lora_targets, lora_dropout=m.lora_dropout
    )
    return presets.get_preset(m.preset, **(model_overrides(m) | lora))


def _abstract(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    dtype = dtype if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else jnp.dtype(dtype)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _rows(mesh: Mesh, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return _abstract(shape, dtype, rows_sharding(mesh, shape))


def abstract_params(model: ModelDef, mesh: Mesh) -> dict:
    """The parameter tree as `ShapeDtypeStruct`s in their shardings (`models/sharding.py`)."""
    shapes = nnx.to_pure_dict(model.abstract)
    shardings = param_shardings(model.abstract, mesh)
    return jax.tree.map(lambda x, s: _abstract(x.shape, x.dtype, s), shapes, shardings)


def abstract_state(params: dict, optimizer: Any, mesh: Mesh) -> TrainState:
    """`TrainState` of `params`: each optimizer-state leaf shaped like a parameter takes that
    parameter's sharding (AdamW's moments), the rest (counts, scalars) are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    trainable = split_trainable(params)[0]
    opt = jax.eval_shape(optimizer.init, trainable)
    by_path = {path: x.sharding for path, x in jax.tree_util.tree_leaves_with_path(trainable)}

    def place(path: tuple, x: Any) -> jax.ShapeDtypeStruct:
        for start in range(len(path)):
            if path[start:] in by_path and x.ndim > 0:
                return _abstract(x.shape, x.dtype, by_path[path[start:]])
        return _abstract(x.shape, x.dtype, replicated)

    opt = jax.tree_util.tree_map_with_path(place, opt)
    key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    scalar = _abstract((), jnp.int32, replicated)
    return TrainState(params, opt, scalar, _abstract(key.shape, key.dtype, replicated), scalar)


def _groups(mesh: Mesh, P: int, s: Shapes) -> Groups:
    G, Lp, T = s.group_size, s.prompt_len, s.response_len
    return Groups(
        _rows(mesh, (P, Lp), jnp.int32),
        _rows(mesh, (P, Lp), bool),
        _rows(mesh, (P, G, T), jnp.int32),
        _rows(mesh, (P, G, T), bool),
    )


def lower_phase(phase: str, cfg: Config, mesh: Mesh, s: Shapes) -> Any:
    """The lowered (not yet compiled) call of `phase` on abstract arguments."""
    model = ModelDef.of(model_config(cfg))
    params = abstract_params(model, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    if phase == "rollout":
        sampling = SamplingConfig(cfg.rollout, s.group_size, (1,), 0)
        P, Lp = s.rollout_prompts, s.prompt_len
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = _abstract(key.shape, key.dtype, replicated)
        return sample.lower(model, params, _rows(mesh, (P, Lp), jnp.int32), _rows(mesh, (P, Lp), bool), key, sampling)
    optimizer = run_optimizer(cfg)
    fns = step_fns(model, cfg, optimizer, mesh)
    if phase == "score":
        return fns.score.lower(params, _groups(mesh, s.score_prompts, s))
    if phase == "prepare":
        return fns.prepare.lower(*prepare_args(cfg, mesh, s))
    mini = jax.eval_shape(fns.take, step_batch(cfg, mesh, s, fns), jnp.int32(0))
    mini = jax.tree.map(lambda x: _rows(mesh, x.shape, x.dtype), mini)
    return fns.update.lower(abstract_state(params, optimizer, mesh), *mini, None)


def prepare_args(cfg: Config, mesh: Mesh, s: Shapes) -> tuple:
    """`StepFns.prepare`'s arguments for the whole step: verdicts, groups, lengths, finish
    reasons, the policy's log-probs and entropies (and the reference's with a KL term)."""
    P, G, T = s.score_prompts, s.group_size, s.response_len
    verdicts = (
        _rows(mesh, (P, G), jnp.float32),
        _rows(mesh, (P, G), bool),
        _rows(mesh, (P, G), bool),
        _rows(mesh, (P,), bool),
    )
    per_token = _rows(mesh, (P, G, T), jnp.float32)
    ref = per_token if cfg.loss.kl_coef > 0 else None
    pg = _rows(mesh, (P, G), jnp.int32)
    return verdicts, _groups(mesh, P, s), pg, pg, per_token, per_token, ref


def step_batch(cfg: Config, mesh: Mesh, s: Shapes, fns: Any) -> tuple[Groups, Any]:
    """The step's `(Groups, LossBatch)` that the update's mini-batches are taken from."""
    args = prepare_args(cfg, mesh, s)
    batch, _ = jax.eval_shape(fns.prepare, *args)
    return args[1], jax.tree.map(lambda x: _rows(mesh, x.shape, x.dtype), batch)


def resident(phase: str, cfg: Config, mesh: Mesh, s: Shapes) -> dict[str, int]:
    """Per-device bytes that stay on the device during `phase` without being its arguments or
    outputs (`fits` adds them): AdamW's state while the sampler, the scoring pass and `prepare`
    run (the parameters are the sampler's and the scoring pass's arguments, resident during
    `prepare`), a saved KL reference (loss.kl_coef > 0 without LoRA), the step's rollout
    (`Rollout` of every sampler call: the other calls' while sampling; kept to the end of the
    step, its log-probs for the sampler/trainer drift), the policy's log-probs and entropies
    while the reference is scored, and the whole step's `(Groups, LossBatch)` that the update's
    mini-batches are taken from. XLA's figures count the update's state once: it is donated
    (`alias_bytes`)."""
    model = ModelDef.of(model_config(cfg))
    params = abstract_params(model, mesh)
    P, G, T = s.score_prompts, s.group_size, s.response_len
    pgt = lambda dtype: _rows(mesh, (P, G, T), dtype)  # noqa: E731
    pg = lambda dtype: _rows(mesh, (P, G), dtype)  # noqa: E731
    rollout = shard_bytes(Rollout(pgt(jnp.int32), pgt(bool), pgt(jnp.float32), pg(jnp.int32), pg(jnp.int32)))
    out = {}
    if phase == "prepare":
        out["params"] = shard_bytes(params)
    if phase != "update":
        out["opt_state"] = shard_bytes(abstract_state(params, run_optimizer(cfg), mesh).opt_state)
    if cfg.loss.kl_coef > 0 and not cfg.model.lora_rank:
        out["kl_reference"] = shard_bytes(params)
    out["rollout"] = rollout * (s.rollout_calls - 1) // s.rollout_calls if phase == "rollout" else rollout
    if phase == "score" and cfg.loss.kl_coef > 0:
        out["policy_logp_entropy"] = 2 * shard_bytes(pgt(jnp.float32))
    if phase == "update":
        out["step_batch"] = shard_bytes(step_batch(cfg, mesh, s, step_fns(model, cfg, run_optimizer(cfg), mesh)))
    return out


def _matmul_params(m: ModelConfig) -> int:
    """Weights of the layers' matrix products (embedding lookups cost no FLOPs)."""
    d, D = m.hidden_size, m.head_dim
    attention = d * D * (2 * m.num_heads + 2 * m.num_kv_heads)
    return m.num_layers * (attention + 3 * d * m.intermediate_size)


def forward_flops(m: ModelConfig, tokens: float, context: float, unembedded: float) -> float:
    """Forward FLOPs of `tokens` tokens that each attend to `context` keys on average, with
    `unembedded` of them projected onto the vocabulary."""
    attention = 4 * m.num_layers * m.num_heads * m.head_dim * context
    return tokens * (2 * _matmul_params(m) + attention) + 2 * m.hidden_size * m.vocab_size * unembedded


def analytic_flops(phase: str, cfg: Config, s: Shapes) -> tuple[float, int]:
    """(whole-mesh FLOPs of one call of `phase`, calls per step), every response `T` tokens long."""
    m, G, Lp, T = model_config(cfg), s.group_size, s.prompt_len, s.response_len
    if phase == "rollout":
        P = s.rollout_prompts
        prefill = forward_flops(m, P * Lp, Lp / 2, P)
        return prefill + forward_flops(m, P * G * T, Lp + T / 2, P * G * T), s.rollout_calls
    if phase == "prepare":  # elementwise shaping and group statistics: no matrix products
        return 0.0, 1
    if phase == "score":
        rows = computed_rows(s.score_prompts * G, s)
        calls = 2 if cfg.loss.kl_coef > 0 else 1  # the reference's pass too
        return forward_flops(m, rows * (Lp + T), (Lp + T) / 2, rows * T), calls
    rows = computed_rows(s.score_prompts // cfg.train.mini_batches * G, s)
    passes = 3 + (1 if m.remat else 0)  # forward, backward (2x), and the rematerialised forward
    return passes * forward_flops(m, rows * (Lp + T), (Lp + T) / 2, rows * T), s.update_calls


def computed_rows(rows: int, s: Shapes) -> int:
    """Sequence rows the policy runs on for `rows` real ones: micro-batches of `micro_rows`,
    each padded to `padded_micro_rows` (training/update.py `micro_split`)."""
    size = min(s.micro_rows, rows)
    return -(-rows // size) * -(-size // s.batch_width) * s.batch_width


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s (its first device's shards)."""
    return sum(
        int(jnp.prod(jnp.asarray(x.sharding.shard_shape(x.shape)))) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


def memory_fields(compiled: Any, hbm_gib: float, resident_bytes: dict[str, int]) -> dict[str, Any]:
    """Per-device bytes of a compiled program (see the module docstring for the identity), and
    `fits`: those plus what else stays on the device meanwhile (`resident`) within `hbm_gib`."""
    mem = compiled.memory_analysis()
    out = {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "generated_code_bytes": int(mem.generated_code_size_in_bytes),
    }
    total = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    held = sum(resident_bytes.values())
    return {
        "per_device_bytes": total,
        "per_device_gib": round(total / GIB, 3),
        **out,
        "resident_bytes": held,
        "resident": resident_bytes,
        "peak_gib": round((total + held) / GIB, 3),
        "hbm_gib": hbm_gib,
        "fits": total + held <= hbm_gib * GIB,
    }


def _xla_flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float((cost or {}).get("flops", -1.0))


def plan_phase(phase: str, cfg: Config, mesh: Mesh, s: Shapes) -> dict[str, Any]:
    """One phase's JSON record: memory, FLOPs, predicted seconds per step, compile times."""
    with jax.set_mesh(mesh):  # as the trainer runs: the model pins its activations' rows to the batch axes
        t0 = time.perf_counter()
        lowered = lower_phase(phase, cfg, mesh, s)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    flops, calls = analytic_flops(phase, cfg, s)
    devices, rate = mesh.size, _PEAK.value * 1e12 * _MFU.value
    record = {"phase": phase, **memory_fields(compiled, _HBM.value, resident(phase, cfg, mesh, s))}
    record |= {
        "xla_flops": _xla_flops(compiled),
        "xla_flops_note": "per device, each while-loop body (decode steps, layer scan, micro-batches) counted once",
        "analytic_flops": flops,
        "analytic_flops_note": "whole mesh, one call, every response max_new_tokens long",
        "calls_per_step": calls,
        "predicted_seconds": float(f"{calls * flops / (devices * rate):.4g}"),
        "mfu": _MFU.value,
        "peak_tflops": _PEAK.value,
    }
    if phase == "rollout":
        read = record["argument_bytes"] + record["temp_bytes"]  # parameter shards and the KV cache, per decode step
        record["decode_bandwidth_seconds"] = float(f"{calls * s.response_len * read / (_HBM_GBPS.value * 1e9):.4g}")
        record["hbm_gbps"] = _HBM_GBPS.value
    record |= {"lower_seconds": round(t1 - t0, 2), "compile_seconds": round(t2 - t1, 2)}
    return record


def describe(cfg: Config, mesh: Mesh, s: Shapes) -> dict[str, Any]:
    """What every record shares: the mesh, the call shapes, the parameter bytes per device."""
    model = ModelDef.of(model_config(cfg))
    params = abstract_params(model, mesh)
    m, t = model_config(cfg), cfg.train
    return {
        "preset": cfg.model.preset,
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "shapes": dataclasses.asdict(s),
        "mini_batch_prompts": t.prompts_per_step // t.mini_batches,
        "micro_batch_size": t.micro_batch_size,
        "padded_micro_rows": -(-s.micro_rows // s.batch_width) * s.batch_width,
        "remat": m.remat,
        "attention": m.attention,
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "param_bytes_per_device": shard_bytes(params),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; set fields with --config.section.field=value")
    if _DEVICES.value and jax.device_count() != _DEVICES.value:
        raise app.UsageError(f"--devices={_DEVICES.value} but jax sees {jax.device_count()} (XLA_FLAGS set too late?)")
    logging.set_verbosity(logging.ERROR)  # sharding fallbacks repeat for every phase
    cfg = from_config_dict(_CONFIG.value)
    mesh = mesh_from_config(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.dcn_data)
    s = phase_shapes(cfg, mesh, _ROLLOUT_ROWS.value)
    common = describe(cfg, mesh, s)
    for phase in _PHASES.value:
        print(json.dumps({**plan_phase(phase, cfg, mesh, s), **common}), flush=True)


if __name__ == "__main__":
    app.run(main)
