"""TRIM-KV retention policy (Bui et al., "Cache What Lasts", arXiv 2512.03324).

Each token carries the log retention ``log beta_i`` its layer's gate predicted when it was
created; at step t its importance is ``beta_i^(t - pos_i)``. Score = (t - pos_i) * log beta_i,
where t is the position of the next token, so the token with the smallest decayed retention goes.
Gates that also give a log initial importance (``log_alpha``, a kvbound extension,
:class:`kvbound.gates.RetentionGate`) add it: the importance is ``alpha_i beta_i^(t - pos_i)``.

``lookahead=n`` (the official code's ``lookahead_steps``, DBTrimKV's "future utility") scores a
token by its retention summed over the next n queries instead:
``log sum_{k<n} beta^(age + k) = age * log beta + log((1 - beta^n) / (1 - beta))``, which favours
slowly decaying tokens by up to log n over fast-decaying ones of the same current retention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbound.errors import check_int
from kvbound.policies.base import Policy


@dataclass
class RetentionPolicy(Policy):
    """TRIM-KV: keep the top-M tokens by decayed learned retention (arXiv 2512.03324)."""

    name: ClassVar[str] = "trimkv"
    needs_gates: ClassVar[bool] = True
    #: score by the retention summed over the next ``lookahead`` queries (1: the paper's score)
    lookahead: int = 1

    def __post_init__(self) -> None:
        check_int("lookahead", self.lookahead, minimum=1)

    def init_layer(self, layer) -> None:
        layer.add_state("log_beta")

    def score(self, layer) -> torch.Tensor:
        # NaN (a broken gate or model) is caught by the cache for every policy
        age = (layer.row_seen.view(-1, 1, 1) - layer.positions).float()
        score = age * layer.log_beta
        if self.lookahead > 1:
            score = score + lookahead_bonus(layer.log_beta, self.lookahead)
        log_alpha = layer.log_alpha
        if log_alpha is not None:  # gates with an initial importance: alpha beta^age
            score = score + log_alpha
        return score


def lookahead_bonus(log_beta: torch.Tensor, n: int) -> torch.Tensor:
    """``log((1 - beta^n) / (1 - beta))``, from 0 (beta -> 0) to log n (beta -> 1), computed
    stably: beta = 1 exactly (a saturated gate) gives log n."""
    x = log_beta.float().clamp(max=-1e-7)
    return torch.log(-torch.expm1(n * x)) - torch.log(-torch.expm1(x))
