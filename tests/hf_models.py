"""Tiny randomly initialised Hugging Face models saved with `save_pretrained` (test-only)."""

from __future__ import annotations

import numpy as np

LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
)
SIZES = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


GEMMA3_LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]


def save_tiny(kind: str, directory: str, seed: int = 0):
    """Saves a tiny `llama`, `llama3` (rope scaling), `qwen2` (qkv bias, tied), `qwen3` (QK-norm,
    head_dim independent of hidden / heads) or `gemma3` (sliding window of 4 on layers 0 and 2,
    two rope bases, linear rope scaling, (1 + w) norms, tied) model; returns it."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if kind == "qwen3":
        cfg = transformers.Qwen3Config(
            **SIZES, head_dim=32, rope_theta=1e6, tie_word_embeddings=False, rms_norm_eps=1e-6
        )
        model = transformers.Qwen3ForCausalLM(cfg)
    elif kind == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            **(SIZES | {"num_hidden_layers": 3}),
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=4,
            layer_types=GEMMA3_LAYERS,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        )
        model = transformers.Gemma3ForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**SIZES, rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # HF initialises biases at 0; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    else:
        extra = {"rope_scaling": LLAMA3_ROPE} if kind == "llama3" else {}
        cfg = transformers.LlamaConfig(**SIZES, rope_theta=5e5, tie_word_embeddings=False, rms_norm_eps=1e-5, **extra)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # HF initialises norms at 1 (Gemma: 0); make them matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0 if kind == "gemma3" else 1.0, 0.2)
        if kind == "gemma3":
            # At HF's 0.02 init the MLP's pre-activations are ~N(0, 0.03), where tanh-GELU and exact
            # GELU agree to ~1e-7, and the logits are ~0.5: exact GELU would pass at 1e-4. Gate
            # weights of std 0.25 put the pre-activations at ~N(0, 2), where the two differ most,
            # and tied embeddings of std 0.3 give logits ~18: exact GELU then misses by ~9e-4
            # (tanh-GELU matches to ~4e-6).
            for layer in model.model.layers:
                layer.mlp.gate_proj.weight.normal_(0.0, 0.25)
            model.model.embed_tokens.weight.normal_(0.0, 0.3)
    model.eval()
    model.save_pretrained(directory)
    return model


def padded_batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded tokens, validity and position ids (counted over real tokens)."""
    tokens = np.array(
        [[0, 0, 0, 5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 9, 8, 7, 6, 5, 4, 3, 2, 1]]
    )
    valid = np.ones_like(tokens, bool)
    valid[0, :3] = False
    valid[2, 0] = False
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    return tokens, valid, positions


def hf_logits(model, tokens, valid, positions) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(valid.astype(np.int64)),
            position_ids=torch.tensor(positions),
        )
    return out.logits.float().numpy()
