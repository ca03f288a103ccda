"""TOVA, Token Omission Via Attention (Oren et al., arXiv 2401.06104).

Score = the attention the most recent query gives each resident token, averaged over all query
heads of the layer, so every KV head keeps the same token set (layer-wise, as the official
``TOVACache``). No sinks, no window; the newest token is not forced (kvpress forces it).
Deviation: the paper evicts one token per step (buffer 1); with a larger cache buffer eviction
runs every ``buffer`` steps, scored by the last query seen.
Pooled budgets (``budget_scope`` "layer"/"global"): each KV head's tokens are scored by its own
query group's attention, a distribution over that head's tokens (AdaKV's normalisation, arXiv
2407.11550), so heads that attend sharply keep few tokens and diffuse heads many.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbound.policies.attention_rows import recent_probs
from kvbound.policies.base import Policy


@dataclass
class TOVAPolicy(Policy):
    """Last query's attention, mean over every head of the layer (arXiv 2401.06104)."""

    name: ClassVar[str] = "tova"
    query_window: ClassVar[int] = 1

    def score(self, layer) -> torch.Tensor:
        probs, _ = recent_probs(layer)  # (B, H_kv, g, w <= 1, n)
        b, h_kv, _, _, n = probs.shape
        if probs.shape[3] == 0:
            return torch.zeros(b, h_kv, n, device=probs.device)
        # TOVA's scores are shared by all heads, so every head holds the same tokens slot by
        # slot and a mean over all query heads per slot is a mean per token.
        last = probs[:, :, :, -1].mean(dim=(1, 2))  # (B, n)
        return last[:, None].expand(b, h_kv, n).contiguous()
