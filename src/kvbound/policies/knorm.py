"""K-norm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression", arXiv 2406.11430): keep the keys with the smallest L2 norm.

Score = -||k_i||_2 in fp32 (RoPE is a rotation, so post-RoPE norms equal pre-RoPE ones).
Deviation: the official code leaves layers 0-1 uncompressed and prunes only after 2048 tokens;
here every layer keeps M tokens (a strict per-head budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbound.policies.base import Policy


@dataclass
class KNormPolicy(Policy):
    """Keep low-norm keys (arXiv 2406.11430)."""

    name: ClassVar[str] = "knorm"

    def score(self, layer) -> torch.Tensor:
        return -torch.linalg.vector_norm(layer.keys_.float(), dim=-1)
