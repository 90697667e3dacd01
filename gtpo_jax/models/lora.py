"""LoRA adapters on a pure-dict parameter tree: what is trained, what is frozen, and the two exports.

The adapters live in the model graph (`transformer.Dense`: leaves `lora_a` `[.., in, r]` and
`lora_b` `[.., r, out]`, float32, B initialised at 0). A tree that holds adapters trains only
them: `split_trainable` gives `(adapters, frozen base)`, `join` puts them back. The KL
reference of a LoRA run is the base with its adapters off (`adapters_off`: B = 0, an exact 0 is
added), computed from the same tree: no second copy of the weights.

Exports: `merged` folds `(alpha / r) * A @ B` into each kernel (a plain checkpoint of the base's
shape); `peft_tensors` / `peft_config` are the adapters alone in PEFT's layout
(`base_model.model.<HF module>.lora_A.weight` `[r, in]`, `lora_B.weight` `[out, r]`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from gtpo_jax.models.families import family
from gtpo_jax.models.sharding import abstract_model, param_shardings
from gtpo_jax.models.transformer import ModelConfig, Transformer

ADAPTER_LEAVES = ("lora_a", "lora_b")


def is_adapter(path: tuple[Any, ...]) -> bool:
    return path[-1] in ADAPTER_LEAVES


def has_adapters(params: Any) -> bool:
    return any(is_adapter(p) for p in traverse_util.flatten_dict(params))


def split_trainable(params: dict) -> tuple[dict, dict]:
    """`(trainable, frozen)`: the adapters and the rest when the tree has adapters, else `(params, {})`."""
    flat = traverse_util.flatten_dict(params)
    if not any(is_adapter(p) for p in flat):
        return params, {}
    adapters = {p: v for p, v in flat.items() if is_adapter(p)}
    frozen = {p: v for p, v in flat.items() if not is_adapter(p)}
    return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(frozen)


def join(trainable: dict, frozen: dict) -> dict:
    """The whole tree again (`split_trainable`'s inverse)."""
    if not frozen:
        return trainable
    return traverse_util.unflatten_dict(traverse_util.flatten_dict(frozen) | traverse_util.flatten_dict(trainable))


def adapters_off(params: dict) -> dict:
    """The same tree with every B zeroed: the base model's outputs exactly (the KL reference)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: jnp.zeros_like(v) if p[-1] == "lora_b" else v for p, v in flat.items()})


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The config of the model without adapters (what `merged` and `base_params` lay out)."""
    return dataclasses.replace(cfg, lora_rank=0)


def base_params(params: dict) -> dict:
    """The frozen base alone (adapters dropped), laid out like `base_config`'s model."""
    return split_trainable(params)[1] or params


def merged(params: dict, cfg: ModelConfig) -> dict:
    """The base with each adapter folded in (`kernel + (alpha / r) A @ B`, in float32, then cast
    to the kernel's dtype), laid out like `base_config(cfg)`'s model."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, value in flat.items():
        if is_adapter(path):
            continue
        if path[-1] == "kernel" and path[:-1] + ("lora_a",) in flat:
            a, b = flat[path[:-1] + ("lora_a",)], flat[path[:-1] + ("lora_b",)]
            delta = jnp.einsum("...ir,...ro->...io", a, b) * (cfg.lora_alpha / cfg.lora_rank)
            value = (value.astype(jnp.float32) + delta).astype(value.dtype)
        out[path] = value
    return traverse_util.unflatten_dict(out)


def add_adapters(base: dict, cfg: ModelConfig, mesh: Mesh, seed: int = 0) -> dict:
    """`base` (e.g. a loaded checkpoint's tree) with freshly initialised adapters, in their
    shardings: the same adapters `Transformer(cfg, rngs=nnx.Rngs(seed))` draws (the base weights
    that initialisation would also draw are unused, and compiled away)."""
    if not cfg.lora_rank:
        return base
    shardings = split_trainable(param_shardings(abstract_model(cfg)[1], mesh))[0]

    @functools.partial(jax.jit, out_shardings=shardings)
    def init() -> dict:
        return split_trainable(nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)))))[0]

    return join(init(), base)


def _module_names(cfg: ModelConfig) -> dict[str, str]:
    """Our adapted module path ("attn.q") -> the HF module stem ("self_attn.q_proj")."""
    names = family(cfg.architecture).hf_block_names(cfg)
    return {k: v for k, v in names.items() if k.split(".")[-1] in cfg.lora_targets}


def peft_tensors(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(PEFT name, float32 host array) of every adapter, one per layer, in PEFT's `[out, in]` layout."""
    modules = _module_names(cfg)
    for path, value in traverse_util.flatten_dict(params).items():
        if not is_adapter(path):
            continue
        stem = modules[".".join(map(str, path[1:-1]))]  # path: ("layers", "attn", "q", "lora_a")
        which = "lora_A" if path[-1] == "lora_a" else "lora_B"
        host = np.asarray(jax.device_get(value), np.float32)
        for i, tensor in enumerate(host):
            yield f"base_model.model.model.layers.{i}.{stem}.{which}.weight", np.ascontiguousarray(tensor.T)


def peft_config(cfg: ModelConfig, base_model: str = "") -> dict[str, Any]:
    """`adapter_config.json` of the adapters (`base_model`: where the base checkpoint lives)."""
    targets = sorted({stem.split(".")[-1] for stem in _module_names(cfg).values()})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
