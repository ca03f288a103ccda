"""KeyDiff (Park et al., arXiv 2504.15364): keep the keys least similar to the mean key direction.

Anchor = mean of the unit-normalised resident keys of each (row, KV head), padding excluded;
score = -cos(k_i, anchor) in fp32. No window, no sinks. The paper processes the prompt block by
block; with ``prefill_chunk_size`` this cache does the same (peak M + buffer + chunk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvbound.policies.base import Policy


@dataclass
class KeyDiffPolicy(Policy):
    """Key diversity: -cosine to the mean unit key (arXiv 2504.15364)."""

    name: ClassVar[str] = "keydiff"

    def score(self, layer) -> torch.Tensor:
        keys = layer.keys_.float()
        valid = (layer.positions >= 0)[..., None].float()
        unit = F.normalize(keys, p=2, dim=-1) * valid
        anchor = unit.sum(2, keepdim=True)  # the mean unit key's direction (cosine: no scale)
        return -F.cosine_similarity(keys, anchor, dim=-1)
