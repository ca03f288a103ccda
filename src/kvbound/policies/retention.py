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

``attention_weight=w`` (a kvbound extension, off by default) adds what the cache sees as it
generates: ``w * log(a_i + eps)``, with ``a_i`` the attention the latest query gives token ``i``
(TOVA's evidence, Oren et al., arXiv 2401.06104, per KV head: the mean over its query group).
The gate predicts when a token is created how long it will matter; the attention says whether it
matters now. With it the policy is no longer the paper's query-agnostic score: results name it
apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbound.errors import KVBoundError, check_int
from kvbound.policies.attention_rows import recent_probs
from kvbound.policies.base import Policy

#: floor of the attention in ``log(a + eps)``: a token no query looks at scores log(eps) ~ -14
ATTENTION_EPS = 1e-6


@dataclass
class RetentionPolicy(Policy):
    """TRIM-KV: keep the top-M tokens by decayed learned retention (arXiv 2512.03324)."""

    name: ClassVar[str] = "trimkv"
    needs_gates: ClassVar[bool] = True
    #: score by the retention summed over the next ``lookahead`` queries (1: the paper's score)
    lookahead: int = 1
    #: weight of the log attention of the latest query in the score (0: the paper's score)
    attention_weight: float = 0.0

    def __post_init__(self) -> None:
        check_int("lookahead", self.lookahead, minimum=1)
        if not (isinstance(self.attention_weight, (int, float))
                and not isinstance(self.attention_weight, bool) and self.attention_weight >= 0):
            raise KVBoundError(f"attention_weight must be a number >= 0, got "
                               f"{self.attention_weight!r}.")

    @property
    def query_window(self) -> int:  # the hook buffers the latest query when the score reads it
        return 1 if self.attention_weight else 0

    def describe(self) -> dict:
        """The paper's settings, plus ``attention_weight`` where it is on."""
        out = super().describe()
        if not self.attention_weight:
            out.pop("attention_weight")
        return out

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
        if self.attention_weight:
            score = score + self.attention_weight * latest_log_attention(layer)
        return score


def latest_log_attention(layer) -> torch.Tensor:
    """(B, H_kv, n) ``log(a + eps)`` of the attention the layer's latest query gives each
    resident token, the mean over the KV head's query group (pooled layers: over every query
    head, each attending only to its own head's slots, a shift that leaves the ranking as it
    is); zeros before any query was seen."""
    probs, _ = recent_probs(layer)  # (B, H_kv, g, w <= 1, n) or pooled (B, 1, H_q, w, n)
    if probs.shape[3] == 0:
        return torch.zeros(probs.shape[0], probs.shape[1], probs.shape[-1], device=probs.device)
    return torch.log(probs[:, :, :, -1].mean(2) + ATTENTION_EPS)


def lookahead_bonus(log_beta: torch.Tensor, n: int) -> torch.Tensor:
    """``log((1 - beta^n) / (1 - beta))``, from 0 (beta -> 0) to log n (beta -> 1), computed
    stably: beta = 1 exactly (a saturated gate) gives log n."""
    x = log_beta.float().clamp(max=-1e-7)
    return torch.log(-torch.expm1(n * x)) - torch.log(-torch.expm1(x))
