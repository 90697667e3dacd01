"""Hugging Face checkpoints <-> our parameters.

`load_hf(dir)` reads `config.json` and the safetensors files (one, or shards with an index) of
a checkpoint of a family in `models/families.py` and builds a `Transformer` whose arrays are created tensor by tensor
directly in their target shardings: each device receives only its slice, read from the
memory-mapped file. `export_hf(model, dir)` writes the same format back, so a trained policy
can be served by any HF-compatible engine.

Layout differences: torch `Linear.weight` is `[out, in]`, our kernels `[in, out]` (transposed);
`lm_head.weight` is `[V, d]`, our `lm_head` `[d, V]`; HF stores one tensor per layer, we one
stacked `[L, ...]` array per parameter (`transformer.stacked_blocks`); the rest maps one to
one, with the per-family names of `models/families.py`. A multimodal checkpoint (config.json
with `text_config`, e.g. Gemma3ForConditionalGeneration) loads its text model from under the
family's `hf_wrapped` prefixes, with a warning that its vision tensors are not loaded; under
any other prefix it is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import ml_dtypes
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from gtpo_jax.models.families import config_from_hf, config_to_hf, family, family_of_hf
from gtpo_jax.models.lora import base_config, merged, peft_config, peft_tensors
from gtpo_jax.models.safetensors_io import CheckpointReader, save_checkpoint, save_file
from gtpo_jax.models.sharding import DEFAULT_RULES, Rules, abstract_model, merge_params, param_shardings
from gtpo_jax.models.transformer import ModelConfig, Transformer

__all__ = ["config_from_hf", "config_to_hf", "export_hf", "hf_name", "hf_tensors", "load_hf", "read_config"]

_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Buffers some checkpoints carry that are recomputed here.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name(path: tuple[Any, ...], cfg: ModelConfig) -> tuple[str, bool]:
    """HF tensor name of one of our parameters, and whether the layout is transposed.

    A parameter of the stacked layers (`("layers", ...)`, shape `[L, ...]`) gets a name with a
    `{i}` placeholder for the layer index; HF stores one tensor per layer.
    """
    match path:
        case ("embed",):
            return "model.embed_tokens.weight", False
        case ("lm_head",):
            return "lm_head.weight", True
        case ("final_norm", "scale"):
            return "model.norm.weight", False
        case ("layers", *rest):
            stem = family(cfg.architecture).hf_block_names(cfg).get(".".join(map(str, rest[:-1])))
            if stem is not None and rest[-1] in ("kernel", "bias", "scale"):
                suffix = "bias" if rest[-1] == "bias" else "weight"
                return f"model.layers.{{i}}.{stem}.{suffix}", rest[-1] == "kernel"
    raise KeyError(f"no Hugging Face name for parameter {'/'.join(map(str, path))}")


def _config_json(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; a Hugging Face checkpoint directory holds config.json")
    return json.loads(path.read_text())


def read_config(directory: str | os.PathLike, **overrides: Any) -> ModelConfig:
    return config_from_hf(_config_json(directory), **overrides)


def _text_model_names(hf: dict, reader: CheckpointReader, directory: Path) -> tuple[Callable[[str], str], str]:
    """Our HF name -> the checkpoint's, and the prefix of the tensors that belong to the model.

    A text checkpoint uses the names as they are. A multimodal wrapper (`text_config` in
    config.json, e.g. Gemma3ForConditionalGeneration) stores its text model under one of the
    family's `hf_wrapped` prefixes; its other tensors (vision tower, projector) are not loaded.
    """
    if "text_config" not in hf:
        return (lambda name: name), ""
    layouts = family_of_hf(hf).hf_wrapped
    for prefix, lm_head in layouts:
        if prefix + "embed_tokens.weight" in reader:

            def rename(name: str, prefix: str = prefix, lm_head: str = lm_head) -> str:
                return lm_head if name == "lm_head.weight" else prefix + name.removeprefix("model.")

            return rename, prefix
    raise ValueError(
        f"{directory / 'config.json'}: a multimodal checkpoint (text_config) whose text model is under none of "
        f"the prefixes {', '.join(p for p, _ in layouts)} (its tensors are named e.g. {reader.keys()[:3]}); "
        "convert it to a text-only checkpoint (transformers: save the text model as a "
        f"{family_of_hf(hf).hf_architecture} with save_pretrained) and load that directory"
    )


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
    hf = _config_json(directory)
    cfg = config_from_hf(hf, **overrides)
    reader = CheckpointReader(directory)
    rename, text_prefix = _text_model_names(hf, reader, directory)
    graphdef, abstract = abstract_model(cfg)
    if mesh is not None:
        shardings = dict(_flat(param_shardings(abstract, mesh, rules)))
    target = _NP_DTYPES[cfg.param_dtype]
    params, used = [], set()
    for path, leaf in _flat(nnx.to_pure_dict(abstract)):
        name, transposed = hf_name(path, cfg)
        names = [rename(name.format(i=i)) for i in range(cfg.num_layers)] if path[0] == "layers" else [rename(name)]
        sources = []
        for n in names:
            if n not in reader:
                raise KeyError(f"{directory}: checkpoint has no tensor {n!r} (needed for {'/'.join(map(str, path))})")
            source = reader[n].T if transposed else reader[n]
            expected = tuple(leaf.shape[1:]) if path[0] == "layers" else tuple(leaf.shape)
            if tuple(source.shape) != expected:
                raise ValueError(f"{directory}: {n} has shape {source.shape}, expected {expected}")
            sources.append(source)
        sharding = shardings[path] if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        params.append((path, _stream(sources, path[0] == "layers", tuple(leaf.shape), sharding, target)))
        used.update(names)
    unused = [k for k in reader.keys() if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if text_prefix:
        other = [k for k in unused if not k.startswith(text_prefix) and k != rename("lm_head.weight")]
        logging.warning(
            "%s: multimodal checkpoint: its text model is loaded, its %d vision tower / projector tensors are "
            "not loaded (e.g. %s)",
            directory,
            len(other),
            other[:2],
        )
        unused = [k for k in unused if k not in other]
    if unused and not (cfg.tie_embeddings and unused == [rename("lm_head.weight")]):
        logging.warning("%s: %d checkpoint tensors not used, e.g. %s", directory, len(unused), unused[:3])
    return merge_params(graphdef, abstract, _unflatten(params))


def _stream(
    sources: list[np.ndarray],
    stacked: bool,
    shape: tuple[int, ...],
    sharding: NamedSharding | SingleDeviceSharding,
    dtype: np.dtype,
) -> jax.Array:
    """Each device gets only its slice of the (memory-mapped) tensors, converted to `dtype`;
    `stacked` tensors (one per layer) are stacked along a new leading axis."""

    def read(idx: tuple[slice, ...]) -> np.ndarray:
        if not stacked:
            return np.asarray(sources[0][idx], dtype=dtype)
        return np.stack([np.asarray(sources[i][idx[1:]], dtype=dtype) for i in range(shape[0])[idx[0]]])

    return jax.make_array_from_callback(shape, sharding, read)


def hf_tensors(model: Transformer) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array in HF layout) for every parameter, in the parameter dtype."""
    for path, value in _flat(nnx.to_pure_dict(nnx.state(model))):
        name, transposed = hf_name(path, model.cfg)
        host = np.asarray(jax.device_get(value))
        for i, tensor in enumerate(host if path[0] == "layers" else [host]):
            yield name.format(i=i), np.ascontiguousarray(tensor.T if transposed else tensor)


def export_hf(
    model: Transformer,
    directory: str | os.PathLike,
    max_shard_bytes: int = 5 * 2**30,
    *,
    adapters: str = "merge",
    base_model: str = "",
) -> list[str]:
    """Writes `config.json` and safetensors (sharded past `max_shard_bytes`) for `model`.

    A model with LoRA adapters is written with them folded into its kernels (`adapters="merge"`:
    a plain checkpoint of the base architecture), or as the adapters alone in PEFT's layout
    (`adapters="peft"`: `adapter_model.safetensors` + `adapter_config.json`, naming `base_model`
    as where the base checkpoint lives; load with `peft.PeftModel.from_pretrained(base, dir)`)."""
    if adapters not in ("merge", "peft"):
        raise ValueError(f"adapters={adapters!r}: expected 'merge' or 'peft'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    if cfg.lora_rank:
        params = nnx.to_pure_dict(nnx.state(model))
        if adapters == "peft":
            save_file(dict(peft_tensors(params, cfg)), directory / "adapter_model.safetensors")
            (directory / "adapter_config.json").write_text(json.dumps(peft_config(cfg, base_model), indent=2))
            return ["adapter_config.json", "adapter_model.safetensors"]
        model = merge_params(*abstract_model(base_config(cfg)), merged(params, cfg))
    files = save_checkpoint(hf_tensors(model), directory, max_shard_bytes)
    (directory / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=2))
    return ["config.json", *files]
