"""The model-family seam: one `Family` entry per supported checkpoint family.

Everything that differs between Llama, Qwen2, Qwen3 and Gemma 3 lives here, as data (tensor
names, architectural switches, stop tokens, GGUF keys) plus two small hooks that read and write
the family's own `config.json` fields. `transformer.py` reads only the architectural switches
of `ModelConfig`, `weights.py` and `gguf.py` read the names and hooks of the family named by
`ModelConfig.architecture`; nothing else looks at the family's name (README, "Model families").
Adding a family is one entry in `FAMILIES` plus its parity test in `tests/test_model.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from gtpo_jax.models.transformer import ARCHITECTURES, FULL, SLIDING, ModelConfig, RopeScaling

# Our block parameter names (`transformer.Block`) -> HF names under `model.layers.{i}.`; the
# norms and MLP/attention projections shared by every family.
_ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
_MLP = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_QK_NORMS = {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
_PRE_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_SANDWICH_NORMS = {
    "attn_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}
# llama.cpp tensor names inside `blk.{i}.` -> HF names under `model.layers.{i}.`.
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_GGUF_GEMMA_BLOCK = _GGUF_BLOCK | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

# Architectural switches of `ModelConfig`; each family states all of them (defaults: Llama).
_SWITCHES = dict(qkv_bias=False, qk_norm=False, norm_plus_one=False, post_norms=False, scale_embeddings=False,
                 activation="silu")  # fmt: skip

# transformers' config-class defaults (LlamaConfig, Qwen2Config, Qwen3Config, Gemma3TextConfig) of
# the config.json keys read here: a key a config.json leaves out (transformers 4.x writes only what
# differs from them, e.g. the Hub's Gemma 3 `text_config`s) takes its own family's value. None:
# derived as transformers derives it (num_key_value_heads = heads, head_dim = hidden / heads).
_HF_DEFAULTS_LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=None, head_dim=None, rms_norm_eps=1e-6,
                          max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False)  # fmt: skip
_HF_DEFAULTS_QWEN2 = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, head_dim=None, rms_norm_eps=1e-6,
                          max_position_embeddings=32768, rope_theta=10000.0, tie_word_embeddings=False)  # fmt: skip
_HF_DEFAULTS_QWEN3 = _HF_DEFAULTS_QWEN2 | dict(head_dim=128)
_HF_DEFAULTS_GEMMA3 = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                           max_position_embeddings=131072, rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                           tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                           sliding_window_pattern=6)  # fmt: skip

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Family:
    """What one checkpoint family needs beyond the shared decoder (see the module docstring)."""

    name: str  # ModelConfig.architecture; the HF `model_type` written on export
    hf_architecture: str  # `architectures[0]` written on export
    hf_model_types: tuple[str, ...]  # `model_type` values read
    switches: Mapping[str, Any]  # ModelConfig fields fixed by the family
    block_norms: Mapping[str, str]  # our norm names in a block -> HF names
    activation_key: str  # config.json key of the MLP activation
    hf_activation: str  # its value
    read_config: Callable[[dict], dict]  # family-specific ModelConfig fields from config.json (defaults filled)
    write_config: Callable[[ModelConfig], dict]  # family-specific config.json fields
    stop_tokens: tuple[str, ...]  # tokens that end an assistant turn (besides eos)
    hf_defaults: Mapping[str, Any]  # transformers' defaults for config.json keys left out (see above)
    # Multimodal wrappers (a config.json with `text_config`): for each layout transformers writes,
    # the prefix that replaces `model.` in the text model's tensor names, and the lm_head's name.
    hf_wrapped: tuple[tuple[str, str], ...] = ()
    gguf_block: Mapping[str, str] = dataclasses.field(default_factory=lambda: _GGUF_BLOCK)
    gguf_rotary_permuted: bool = False  # llama.cpp permutes Q/K rows of llama-architecture files
    gguf_norm_shift: float = 0.0  # llama.cpp stores norm weights + shift for (1 + w) norms
    gguf_read_config: Callable[[Callable[[str, Any], Any]], dict] = lambda field: {}
    # `{arch}.*` GGUF keys that must be present: llama.cpp's llama defaults (rope base 1e4, RMS
    # epsilon 1e-5, head size hidden / heads) are wrong for the family.
    gguf_required: tuple[str, ...] = ()
    chat_template: str | None = None  # for checkpoints (GGUF) that carry none

    def hf_block_names(self, cfg: ModelConfig) -> dict[str, str]:
        """Our block module path (joined with '.') -> HF name stem under `model.layers.{i}.`."""
        names = {f"attn.{k}": v for k, v in _ATTN.items()} | {f"mlp.{k}": v for k, v in _MLP.items()}
        names |= dict(self.block_norms)
        if cfg.qk_norm:
            names |= {f"attn.{k}": v for k, v in _QK_NORMS.items()}
        return names


def _reject(hf: dict, keys: tuple[str, ...], what: str) -> None:
    for key in keys:
        if hf.get(key):
            raise ValueError(f"config.json: {key}={hf[key]!r} ({what}) is not supported")


def _rope(hf: dict) -> tuple[dict, dict]:
    """(full-attention, sliding-attention) rope parameters of a transformers 4.x or 5.x config whose
    left-out keys are filled with the family's defaults; a base missing from `rope_parameters` is the
    `rope_theta` / `rope_local_base_freq` key (as transformers reads it)."""
    params = dict(hf.get("rope_parameters") or {})
    if "full_attention" in params:  # 5.x, per layer type (Gemma 3)
        full, local = dict(params["full_attention"] or {}), dict(params.get("sliding_attention") or {})
    else:
        full, local = dict(hf.get("rope_scaling") or {}) | params, {}
    full.setdefault("rope_theta", hf["rope_theta"])
    if hf.get("rope_local_base_freq") is not None:
        local.setdefault("rope_theta", hf["rope_local_base_freq"])
    return full, local


def _rope_fields(full: dict) -> dict:
    kind = full.get("rope_type", full.get("type", "default"))
    fields: dict[str, Any] = {"rope_theta": float(full["rope_theta"])}
    if kind == "llama3":
        fields["rope_scaling"] = RopeScaling(
            factor=float(full["factor"]),
            low_freq_factor=float(full["low_freq_factor"]),
            high_freq_factor=float(full["high_freq_factor"]),
            original_max_position_embeddings=int(full["original_max_position_embeddings"]),
        )
    elif kind == "linear":
        fields["rope_linear_factor"] = float(full["factor"])
    elif kind != "default":
        raise ValueError(f"config.json: rope type {kind!r} is not supported (expected 'default', 'llama3' or 'linear')")
    return fields


def _rope_to_hf(cfg: ModelConfig) -> dict:
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        return {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }
        }
    if cfg.rope_linear_factor != 1.0:
        return {"rope_scaling": {"rope_type": "linear", "factor": cfg.rope_linear_factor}}
    return {}


def _read_llama(hf: dict) -> dict:
    _reject(hf, ("mlp_bias", "attention_bias"), "Llama with biases")
    return {}


def _read_qwen(hf: dict) -> dict:
    _reject(hf, ("use_sliding_window",), "Qwen sliding-window attention")
    if hf.get("model_type") == "qwen3":
        _reject(hf, ("attention_bias",), "Qwen3 with q/k/v bias")
    return {}


def _read_gemma3(hf: dict) -> dict:
    _reject(hf, ("final_logit_softcapping", "attn_logit_softcapping"), "Gemma 2 style logit soft-capping")
    _reject(hf, ("attention_bias", "use_bidirectional_attention"), "Gemma 3 variant")
    layers = int(hf["num_hidden_layers"])
    types = hf.get("layer_types")
    if types is None:  # older configs: every `sliding_window_pattern`-th layer is global
        pattern = int(hf["sliding_window_pattern"])
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    _, local = _rope(hf)
    return {
        "layer_types": tuple(types),
        "sliding_window": int(hf.get("sliding_window") or 0),
        "rope_local_theta": float(local["rope_theta"]),
        "query_pre_attn_scalar": int(hf.get("query_pre_attn_scalar") or 0),
    }


def _write_gemma3(cfg: ModelConfig) -> dict:
    full = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_linear_factor != 1.0:
        full = {"rope_type": "linear", "factor": cfg.rope_linear_factor, "rope_theta": cfg.rope_theta}
    return {
        "layer_types": list(cfg.layer_types),
        "sliding_window": cfg.sliding_window or None,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "rope_parameters": {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta},
        },
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
    }


def _gguf_gemma3(field: Callable[[str, Any], Any]) -> dict:
    """llama.cpp's Gemma 3: every 6th layer global; local rope base 10000 unless stored (llama.cpp
    and transformers both use 10000). llama.cpp's converter stores no `query_pre_attn_scalar`:
    a file's `attention.scale` (= query_pre_attn_scalar ** -0.5), when it has one, gives it;
    otherwise llama.cpp's own rule: key_length, except hidden / heads for the 62-layer 27B
    (gemma_pytorch's rule; the released configs agree: 168 for the 27B, 256 = head_dim for
    270M to 12B)."""
    layers = int(field("gemma3.block_count", None))
    scale = field("gemma3.attention.scale", 0.0)
    if scale:
        scalar = round(float(scale) ** -2)
        if abs(scalar * float(scale) ** 2 - 1) > 1e-4:
            raise ValueError(f"GGUF gemma3.attention.scale={scale}: not 1/sqrt of an integer query_pre_attn_scalar")
    elif layers == 62:
        scalar = int(field("gemma3.embedding_length", None)) // int(field("gemma3.attention.head_count", None))
    else:
        scalar = int(field("gemma3.attention.key_length", None))
    return {
        "layer_types": tuple(SLIDING if (i + 1) % 6 else FULL for i in range(layers)),
        "sliding_window": int(field("gemma3.attention.sliding_window", None)),
        "rope_local_theta": float(field("gemma3.rope.freq_base_swa", 10000.0)),
        "query_pre_attn_scalar": scalar,
    }


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="llama",
            hf_architecture="LlamaForCausalLM",
            hf_model_types=("llama",),
            switches=_SWITCHES,
            block_norms=_PRE_NORMS,
            activation_key="hidden_act",
            hf_activation="silu",
            read_config=_read_llama,
            write_config=lambda cfg: {"attention_bias": False, "mlp_bias": False},
            hf_defaults=_HF_DEFAULTS_LLAMA,
            stop_tokens=("<|eot_id|>", "<|im_end|>"),
            gguf_rotary_permuted=True,
        ),
        Family(
            name="qwen2",
            hf_architecture="Qwen2ForCausalLM",
            hf_model_types=("qwen2",),
            switches=_SWITCHES | {"qkv_bias": True},
            block_norms=_PRE_NORMS,
            activation_key="hidden_act",
            hf_activation="silu",
            read_config=_read_qwen,
            write_config=lambda cfg: {},
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
            hf_defaults=_HF_DEFAULTS_QWEN2,
        ),
        Family(
            name="qwen3",
            hf_architecture="Qwen3ForCausalLM",
            hf_model_types=("qwen3",),
            switches=_SWITCHES | {"qk_norm": True},
            block_norms=_PRE_NORMS,
            activation_key="hidden_act",
            hf_activation="silu",
            read_config=_read_qwen,
            write_config=lambda cfg: {"attention_bias": False},
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
            hf_defaults=_HF_DEFAULTS_QWEN3,
        ),
        Family(
            name="gemma3",
            hf_architecture="Gemma3ForCausalLM",
            hf_model_types=("gemma3_text", "gemma3"),
            switches=_SWITCHES
            | {
                "qk_norm": True,
                "norm_plus_one": True,
                "post_norms": True,
                "scale_embeddings": True,
                "activation": "gelu_tanh",
            },
            block_norms=_SANDWICH_NORMS,
            activation_key="hidden_activation",
            hf_activation="gelu_pytorch_tanh",
            read_config=_read_gemma3,
            write_config=_write_gemma3,
            stop_tokens=("<end_of_turn>",),
            hf_defaults=_HF_DEFAULTS_GEMMA3,
            hf_wrapped=(
                ("model.language_model.", "lm_head.weight"),  # transformers 5.x
                ("language_model.model.", "language_model.lm_head.weight"),
            ),  # 4.x, the Hub's files
            gguf_block=_GGUF_GEMMA_BLOCK,
            gguf_norm_shift=1.0,
            gguf_read_config=_gguf_gemma3,
            gguf_required=("rope.freq_base", "attention.layer_norm_rms_epsilon", "attention.key_length"),
            chat_template=GEMMA_CHAT_TEMPLATE,
        ),
    )
}


if tuple(FAMILIES) != ARCHITECTURES:  # the decoder's list and this table describe the same families
    raise ImportError(f"models/families.py FAMILIES {tuple(FAMILIES)} != transformer.ARCHITECTURES {ARCHITECTURES}")


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.architecture={name!r}: expected one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_hf(hf: dict) -> Family:
    """The family of a parsed `config.json`, by its `model_type`."""
    model_type = hf.get("model_type")
    for f in FAMILIES.values():
        if model_type in f.hf_model_types:
            return f
    known = ", ".join(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise ValueError(f"config.json: model_type={model_type!r} is not supported (expected one of {known})")


def config_from_hf(hf: dict, **overrides: Any) -> ModelConfig:
    """`ModelConfig` from a parsed HF `config.json` (transformers 4.x or 5.x layout)."""
    fam = family_of_hf(hf)
    if "text_config" in hf:  # a multimodal wrapper: read its text model's config
        if not fam.hf_wrapped:
            raise ValueError(f"config.json: a multimodal {fam.name} checkpoint (text_config) is not supported")
        top = {k: hf[k] for k in ("tie_word_embeddings",) if k in hf}
        return config_from_hf({"model_type": fam.hf_model_types[0]} | top | hf["text_config"], **overrides)
    # Keys left out take the family's transformers defaults (explicit nulls are kept: see below).
    hf = dict(fam.hf_defaults) | hf
    extra = fam.read_config(hf)  # first: its unsupported-variant errors are the most useful
    activation = hf.get(fam.activation_key, fam.hf_activation)
    if activation != fam.hf_activation:
        raise ValueError(f"config.json: {fam.activation_key}={activation!r}, expected {fam.hf_activation!r}")
    full, _ = _rope(hf)
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"] or hf["num_attention_heads"],  # None: as many as heads
        head_dim=hf["head_dim"] or 0,  # None (Llama, Qwen2): hidden / heads
        rms_norm_eps=float(hf["rms_norm_eps"]),
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        max_position_embeddings=int(hf["max_position_embeddings"]),
        architecture=fam.name,
    )
    fields |= _rope_fields(full) | dict(fam.switches) | extra
    return ModelConfig(**(fields | overrides))


def config_to_hf(cfg: ModelConfig) -> dict:
    """HF `config.json` contents for a model of this configuration."""
    fam = family(cfg.architecture)
    for name, value in fam.switches.items():
        if getattr(cfg, name) != value:
            raise ValueError(f"model.{name}={getattr(cfg, name)!r}: a {fam.name} checkpoint needs {value!r}")
    written = fam.write_config(cfg)
    if "layer_types" not in written and (
        cfg.sliding_window or cfg.rope_local_theta or cfg.query_pre_attn_scalar != cfg.head_dim
    ):
        raise ValueError(
            f"a {fam.name} config.json has no sliding-window layers, local rope base or query_pre_attn_scalar "
            f"(model.sliding_window={cfg.sliding_window}, rope_local_theta={cfg.rope_local_theta}, "
            f"query_pre_attn_scalar={cfg.query_pre_attn_scalar})"
        )
    return (
        {
            "architectures": [fam.hf_architecture],
            "model_type": fam.hf_model_types[0],
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
            fam.activation_key: fam.hf_activation,
            "torch_dtype": cfg.param_dtype,
        }
        | _rope_to_hf(cfg)
        | written
    )
