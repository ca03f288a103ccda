"""H2O, Heavy-Hitter Oracle (Zhang et al., arXiv 2306.14048).

Score = attention a token has received, accumulated over every query processed while it was
resident (prefill: column sums of the causal attention, computed block-wise over query rows;
decode: one row per step). The most recent ``recent_ratio * M`` tokens are always kept (the
paper's even heavy/recent split, i.e. R = M/2), the rest of M goes to the heavy hitters.

GQA: the group's accumulated scores are averaged (KVCache-Factory ``kv_head`` mode, ``mean``).
Pooled budgets (``budget_scope`` "layer"/"global"): each head's attention is a distribution over
its own tokens (AdaKV's normalisation), so accumulated masses compare across heads; a token's
score is then its group's sum over all query heads of the layer, i.e. the per-head score / H_kv.
Deviation: the paper evicts one token per step (buffer 1); with a larger cache buffer eviction
runs every ``buffer`` steps instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbound.errors import KVBoundError
from kvbound.policies.attention_rows import layer_probs, recent_window
from kvbound.policies.base import Policy


@dataclass
class H2OPolicy(Policy):
    """Accumulated attention + protected recent window (arXiv 2306.14048)."""

    name: ClassVar[str] = "h2o"
    query_window: ClassVar[int] = 1  # makes the hook compute each forward's queries
    #: fraction of the budget kept as the recent window (the paper's 50/50 split)
    recent_ratio: float = 0.5
    #: query rows per block when accumulating a long prefill chunk
    block: int = 256

    def __post_init__(self) -> None:
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise KVBoundError(f"recent_ratio must be in [0, 1], got {self.recent_ratio}.")
        if self.block < 1:
            raise KVBoundError(f"block must be >= 1, got {self.block}.")

    def init_layer(self, layer) -> None:
        layer.add_state("h2o")

    def on_update(self, layer, new_queries: torch.Tensor | None) -> None:
        if new_queries is None:
            return
        q = new_queries.shape[2]
        pos = layer.positions
        qpos = pos[:, 0, -q:]  # the new tokens' positions, the same in every head
        acc = torch.zeros(pos.shape, dtype=torch.float32, device=pos.device)
        for start in range(0, q, self.block):
            stop = min(start + self.block, q)
            probs = layer_probs(layer, new_queries[:, :, start:stop], qpos[:, start:stop])
            acc += probs.sum(-2).mean(2)  # sum over queries, mean over the GQA group
        layer.state("h2o").add_(acc)

    def score(self, layer) -> torch.Tensor:
        recent = int(self.recent_ratio * layer.budget)
        scores = layer.state("h2o").clone()
        return scores.masked_fill(recent_window(layer, recent), math.inf)
