"""Random eviction: a sanity floor for every other policy.

Scores are uniform random numbers drawn from a generator seeded by ``(seed, layer, eviction
count)``, so a run is reproducible for a given seed, different seeds evict differently, and two
calls at the same cache state return the same scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbound.policies.base import Policy


@dataclass
class RandomPolicy(Policy):
    """Keep a uniformly random subset of M tokens per (row, KV head)."""

    name: ClassVar[str] = "random"
    seed: int = 0

    def score(self, layer) -> torch.Tensor:
        key = (self.seed * 1_000_003 + layer.layer_idx * 10_007 + layer.evictions) % (2**63)
        gen = torch.Generator().manual_seed(key)
        scores = torch.rand(tuple(layer.positions.shape), generator=gen)
        return scores.to(layer.positions.device)
