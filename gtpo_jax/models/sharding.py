"""Logical axis names -> `PartitionSpec`s over a mesh with axes `data`, `fsdp`, `tensor`.

Every parameter of `Transformer` carries `logical_axes` metadata (e.g. `("layers", "embed", "mlp")`
for a stacked layer parameter).
`DEFAULT_RULES` shards the embedding dimension over `fsdp` (FSDP / ZeRO-3 style) and heads,
key-value heads, MLP width and vocabulary over `tensor` (Megatron-style tensor parallelism);
batches are split over `data` and `fsdp` together.

A dimension that a mesh axis does not divide (e.g. 2 key-value heads on a tensor axis of 4) is
replicated over that axis instead, and the fallback is logged: a model always loads.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gtpo_jax.models.transformer import ModelConfig, Transformer

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Mapping[str, str | tuple[str, ...] | None]
DEFAULT_RULES: Rules = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "lora": None,  # the rank of a LoRA adapter (models/lora.py): small, replicated
    "layers": None,  # the stacked-layer axis (`transformer.stacked_blocks`): every device holds all layers
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh; one size may be -1 (the remaining devices).

    Axes are `Auto`: inside jit, XLA propagates shardings from the annotated inputs, so model
    code needs no per-op sharding annotations.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1; got data={data}, fsdp={fsdp}, tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into axes of sizes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {np.prod(sizes)} devices, have {len(devices)}"
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * 3)


def _mesh_axes(rule: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)


def spec_for(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> PartitionSpec:
    """The `PartitionSpec` of one array; undividable dimensions fall back to replication."""
    out: list[Any] = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axes = tuple(a for a in _mesh_axes(rules.get(name) if name else None) if mesh.shape.get(a, 1) > 1)
        width = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if mesh_axes and size % width:
            _log_fallback(name, size, mesh_axes, width)
            mesh_axes = ()
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*out)


@functools.cache
def _log_fallback(name: str, size: int, axes: tuple[str, ...], width: int) -> None:
    logging.warning("logical axis %r of size %d does not split over %s (%d); replicated there", name, size, axes, width)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes(state: nnx.State) -> dict:
    """Pure-dict tree of each parameter's logical axis names."""
    return nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state, is_leaf=_is_variable))


def param_shardings(model_or_state: nnx.Module | nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """Pure-dict tree of `NamedSharding`s for a model's parameters (abstract or concrete)."""
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    return nnx.to_pure_dict(
        jax.tree.map(
            lambda v: NamedSharding(mesh, spec_for(v.get_metadata()["logical_axes"], v.shape, mesh, rules)),
            state,
            is_leaf=_is_variable,
        )
    )


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and shape-only state of a model: no memory is allocated."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
    """A policy's graph and shape-only state: with a pure-dict parameter tree, the model.

    Hashed by identity, so a jitted function taking it as a static argument compiles once per
    run (the run builds one `ModelDef`)."""

    graphdef: nnx.GraphDef
    abstract: nnx.State

    @classmethod
    def of(cls, cfg: ModelConfig) -> ModelDef:
        return cls(*abstract_model(cfg))

    def merge(self, params: dict) -> Transformer:
        """The model holding `params` (call inside jit: no copy is made)."""
        return merge_params(self.graphdef, self.abstract, params)


def split_model(model: Transformer) -> tuple[ModelDef, dict]:
    """`(ModelDef, pure-dict params)` of a concrete model."""
    return ModelDef.of(model.cfg), nnx.to_pure_dict(nnx.state(model))


def merge_params(graphdef: nnx.GraphDef, abstract_state: nnx.State, params: dict) -> Transformer:
    """A model from a pure-dict tree of arrays laid out like `abstract_state`."""
    state = jax.tree.map(lambda x: x, abstract_state, is_leaf=_is_variable)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def create_sharded(cfg: ModelConfig, mesh: Mesh, seed: int = 0, rules: Rules = DEFAULT_RULES) -> Transformer:
    """A randomly initialised model created directly in its shardings: each device only ever
    holds its own shards (initialisation runs inside jit with `out_shardings`)."""
    graphdef, abstract = abstract_model(cfg)
    shardings = param_shardings(abstract, mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init() -> dict:
        return nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed))))

    return merge_params(graphdef, abstract, init())


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dimension split over the batch axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(_mesh_axes(rules["batch"]), *([None] * (ndim - 1))))


def batch_width(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """How many ways the batch axes split a leading (rows) dimension."""
    return int(np.prod([mesh.shape[a] for a in _mesh_axes(rules["batch"])]))


def rows_sharding(mesh: Mesh, shape: Sequence[int], rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """`batch_sharding` when the batch axes divide the leading dimension, else replicated."""
    if len(shape) > 0 and shape[0] % batch_width(mesh, rules) == 0:
        return batch_sharding(mesh, len(shape), rules)
    return NamedSharding(mesh, PartitionSpec())
