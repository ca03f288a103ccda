"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453): keep the first 4 tokens (attention sinks) and the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbound.policies.base import Policy


@dataclass
class StreamingPolicy(Policy):
    """Sinks + recency window. Sinks are the cache's ``sinks`` (default 4 for every policy),
    counted inside M.

    Positions are kept as original (not re-indexed inside the cache, unlike the paper's code).
    """

    name: ClassVar[str] = "streaming"

    def score(self, layer) -> torch.Tensor:
        return layer.positions.float()
