"""Hugging Face checkpoints <-> our parameters.

`load_hf(dir)` reads `config.json` and the safetensors files (one, or shards with an index) of
a Llama / Qwen2 checkpoint and builds a `Transformer` whose arrays are created tensor by tensor
directly in their target shardings: each device receives only its slice, read from the
memory-mapped file. `export_hf(model, dir)` writes the same format back, so a trained policy
can be served by any HF-compatible engine.

Layout differences: torch `Linear.weight` is `[out, in]`, our kernels `[in, out]` (transposed);
`lm_head.weight` is `[V, d]`, our `lm_head` `[d, V]`; the rest maps one to one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import ml_dtypes
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from gtpo_jax.models.safetensors_io import CheckpointReader, save_checkpoint
from gtpo_jax.models.sharding import DEFAULT_RULES, Rules, abstract_model, merge_params, param_shardings
from gtpo_jax.models.transformer import ModelConfig, RopeScaling, Transformer

_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Buffers some checkpoints carry that are recomputed here.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name(path: tuple[Any, ...]) -> tuple[str, bool]:
    """HF tensor name of one of our parameters, and whether the layout is transposed."""
    match path:
        case ("embed",):
            return "model.embed_tokens.weight", False
        case ("lm_head",):
            return "lm_head.weight", True
        case ("final_norm", "scale"):
            return "model.norm.weight", False
        case ("layers", i, "attn_norm", "scale"):
            return f"model.layers.{i}.input_layernorm.weight", False
        case ("layers", i, "mlp_norm", "scale"):
            return f"model.layers.{i}.post_attention_layernorm.weight", False
        case ("layers", i, "attn", proj, kind):
            return (
                f"model.layers.{i}.self_attn.{_ATTN[proj]}.{'weight' if kind == 'kernel' else 'bias'}",
                kind == "kernel",
            )
        case ("layers", i, "mlp", proj, "kernel"):
            return f"model.layers.{i}.mlp.{_MLP[proj]}.weight", True
    raise KeyError(f"no Hugging Face name for parameter {'/'.join(map(str, path))}")


def config_from_hf(hf: dict, **overrides: Any) -> ModelConfig:
    """`ModelConfig` from a parsed HF `config.json` (transformers 4.x or 5.x layout)."""
    model_type = hf.get("model_type")
    if model_type not in ("llama", "qwen2"):
        raise ValueError(f"config.json: model_type={model_type!r} is not supported (expected 'llama' or 'qwen2')")
    if hf.get("mlp_bias") or (model_type == "llama" and hf.get("attention_bias")):
        raise ValueError("config.json: Llama with mlp_bias / attention_bias is not supported")
    if hf.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window=true (Qwen2 sliding-window attention) is not supported")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported (expected 'default' or 'llama3')")
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or 0,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        architecture=model_type,
    )
    return ModelConfig(**(fields | overrides))


def config_to_hf(cfg: ModelConfig) -> dict:
    """HF `config.json` contents for a model of this configuration."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.architecture]
    out = {
        "architectures": [arch],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.architecture == "llama":
        out |= {"attention_bias": False, "mlp_bias": False}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return out


def read_config(directory: str | os.PathLike, **overrides: Any) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; a Hugging Face checkpoint directory holds config.json")
    return config_from_hf(json.loads(path.read_text()), **overrides)


def _flat(tree: dict) -> list[tuple[tuple[Any, ...], Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(k.key for k in path), leaf) for path, leaf in leaves]


def _unflatten(items: list[tuple[tuple[Any, ...], Any]]) -> dict:
    out: dict = {}
    for path, value in items:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def load_hf(
    directory: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    **overrides: Any,
) -> Transformer:
    """A `Transformer` from a HF checkpoint directory, each tensor streamed into its sharding.

    `overrides` replace config fields (`param_dtype="bfloat16"`, `remat=True`, ...). Without a
    mesh everything goes to the default device.
    """
    directory = Path(directory)
    cfg = read_config(directory, **overrides)
    reader = CheckpointReader(directory)
    graphdef, abstract = abstract_model(cfg)
    if mesh is not None:
        shardings = dict(_flat(param_shardings(abstract, mesh, rules)))
    target = _NP_DTYPES[cfg.param_dtype]
    params, used = [], set()
    for path, leaf in _flat(nnx.to_pure_dict(abstract)):
        name, transposed = hf_name(path)
        if name not in reader:
            raise KeyError(f"{directory}: checkpoint has no tensor {name!r} (needed for {'/'.join(map(str, path))})")
        source = reader[name]
        source = source.T if transposed else source
        if tuple(source.shape) != tuple(leaf.shape):
            raise ValueError(f"{directory}: {name} has shape {source.shape}, expected {tuple(leaf.shape)}")
        sharding = shardings[path] if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        params.append((path, _stream(source, sharding, target)))
        used.add(name)
    unused = [k for k in reader.keys() if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if unused and not (cfg.tie_embeddings and unused == ["lm_head.weight"]):
        logging.warning("%s: %d checkpoint tensors not used, e.g. %s", directory, len(unused), unused[:3])
    return merge_params(graphdef, abstract, _unflatten(params))


def _stream(source: np.ndarray, sharding: NamedSharding | SingleDeviceSharding, dtype: np.dtype) -> jax.Array:
    """Each device gets only its slice of the (memory-mapped) tensor, converted to `dtype`."""
    return jax.make_array_from_callback(source.shape, sharding, lambda idx: np.asarray(source[idx], dtype=dtype))


def hf_tensors(model: Transformer) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array in HF layout) for every parameter, in the parameter dtype."""
    for path, value in _flat(nnx.to_pure_dict(nnx.state(model))):
        name, transposed = hf_name(path)
        host = np.asarray(jax.device_get(value))
        yield name, np.ascontiguousarray(host.T if transposed else host)


def export_hf(model: Transformer, directory: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes `config.json` and safetensors (sharded past `max_shard_bytes`) for `model`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = save_checkpoint(hf_tensors(model), directory, max_shard_bytes)
    (directory / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=2))
    return ["config.json", *files]
