"""PyramidKV (Cai et al., arXiv 2406.02069): SnapKV scores with pyramidal layer budgets.

Scoring is :class:`~kvbound.policies.snapkv.SnapKVPolicy`'s (same window, kernel, pooling and GQA
mean). Layer budgets fall linearly with depth and keep the same total as a uniform M: with
``T = M - window`` prefix tokens per layer and L evicted layers, ``min = T / beta``,
``max = 2T - min``, layer ``l`` keeps ``max - l (max - min) / (L - 1)`` prefix tokens plus the
window (rounded down, the remainder going to the lowest layers, so the sum is exactly L * M and
the budgets never increase with depth). The window is SnapKV's (``min(32, M // 2)`` unless set);
if ``M <= window`` every layer keeps M.

Deviations: the reference also caps ``max`` by the prompt length (``max <= n - window``) and
KVCache-Factory falls back to uniform budgets for short prompts; the cache fixes budgets before
seeing the prompt, so neither applies. KVCache-Factory's defaults are window 8 / kernel 7 / max;
we keep SnapKV's window so the two differ only in budgets. PyramidKV matches a uniform M only
in total memory: lower layers hold up to ~2M tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from kvbound.errors import KVBoundError
from kvbound.policies.snapkv import SnapKVPolicy


@dataclass
class PyramidKVPolicy(SnapKVPolicy):
    """SnapKV with linearly decreasing layer budgets, same total (arXiv 2406.02069)."""

    name: ClassVar[str] = "pyramidkv"
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise KVBoundError(f"beta must be >= 1, got {self.beta}.")

    def budgets(self, num_layers: int, budget: int) -> list[int]:
        """Per-layer budgets (window included) for ``num_layers`` evicted layers."""
        window = self.window_at(budget)
        prefix = budget - window
        if num_layers <= 1 or prefix <= 0:
            return [budget] * num_layers
        low = prefix / self.beta
        high = 2 * prefix - low
        step = (high - low) / (num_layers - 1)
        raw = [high - i * step for i in range(num_layers)]
        floors = [math.floor(x + 1e-9) for x in raw]
        extra = num_layers * prefix - sum(floors)
        floors = [f + (1 if i < extra else 0) for i, f in enumerate(floors)]
        return [f + window for f in floors]

    def layer_budget(self, layer_idx: int, evicted: list[int], budget: int) -> int:
        if layer_idx not in evicted:
            return budget
        return self.budgets(len(evicted), budget)[evicted.index(layer_idx)]
