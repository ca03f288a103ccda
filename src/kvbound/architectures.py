"""What kvbound needs to know about a transformers decoder: its attention modules and layer types.

Supported: Llama (SmolLM2), Qwen2, Qwen3, Mistral, Phi3 and Gemma3 (on Gemma3 only the
full-attention layers are evicted; sliding-window layers keep their own window).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from kvbound.errors import KVBoundError, UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3_text", "gemma3")


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_supported(model: nn.Module) -> None:
    model_type = getattr(text_config(model), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"Architecture {model_type!r} is not supported. Supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (each with a ``self_attn``)."""
    check_supported(model)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UnsupportedArchitectureError(
            f"Cannot find decoder layers in {type(model).__name__}; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return list(layers)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in decoder_layers(model)]


def layer_types(model: nn.Module) -> list[str]:
    """'full_attention' or 'sliding_attention' per layer."""
    cfg = text_config(model)
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if types is None:
        window = getattr(cfg, "sliding_window", None)
        uses_window = getattr(cfg, "use_sliding_window", False) and window
        return ["sliding_attention" if uses_window else "full_attention"] * n
    return list(types)


def evicted_layers(model: nn.Module) -> list[int]:
    """Indices of the layers whose cache kvbound bounds (the full-attention layers)."""
    return [i for i, t in enumerate(layer_types(model)) if t == "full_attention"]


def model_fingerprint(model: nn.Module) -> dict:
    check_supported(model)
    cfg = text_config(model)
    return {
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_kv_heads": cfg.num_key_value_heads,
        "num_heads": cfg.num_attention_heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
    }


def query_states(
    attn: nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Recompute the post-RoPE queries (B, Hq, S, d) the attention module is about to use.

    Only attention-based baselines need them (a few rows per step); TRIM-KV does not.
    """
    b, s, _ = hidden_states.shape
    d = attn.head_dim
    if hasattr(attn, "q_proj"):
        q = attn.q_proj(hidden_states)
    else:  # Phi3: fused qkv projection, queries first
        q = attn.qkv_proj(hidden_states)[..., : attn.config.num_attention_heads * d]
    q = q.view(b, s, -1, d)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    q = q.transpose(1, 2)
    cos, sin = position_embeddings
    # transformers has no public per-architecture RoPE accessor (checked against 5.24): use the
    # function the attention module's own file applies. Test:
    # tests/policies/test_policies.py::test_recomputed_attention_rows_equal_the_models
    rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise KVBoundError(f"{type(attn).__module__} has no apply_rotary_pos_emb: attention-based "
                           "policies cannot recompute queries for this architecture.")
    return rope(q, q, cos, sin)[0]
