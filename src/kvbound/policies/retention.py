"""TRIM-KV retention policy (Bui et al., "Cache What Lasts", arXiv 2512.03324).

Each token carries the log retention ``log beta_i`` its layer's gate predicted when it was
created; at step t its importance is ``beta_i^(t - pos_i)``. Score = (t - pos_i) * log beta_i,
where t is the position of the next token, so the token with the smallest decayed retention goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbound.policies.base import Policy


@dataclass
class RetentionPolicy(Policy):
    """TRIM-KV: keep the top-M tokens by decayed learned retention (arXiv 2512.03324)."""

    name: ClassVar[str] = "trimkv"
    needs_gates: ClassVar[bool] = True

    def init_layer(self, layer) -> None:
        layer.add_state("log_beta")

    def score(self, layer) -> torch.Tensor:
        # NaN (a broken gate or model) is caught by the cache for every policy
        age = (layer.row_seen.view(-1, 1, 1) - layer.positions).float()
        return age * layer.log_beta
