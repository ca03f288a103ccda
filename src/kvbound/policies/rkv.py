"""R-KV, redundancy-aware KV compression for reasoning models (Cai et al., arXiv 2505.24133).

Score per KV head over the resident cache, for the tokens outside the observation window (the
last ``window`` tokens, always kept inside M):

* importance ``a``: logits ``q k^T / sqrt(d)`` of the last ``window`` queries, max over the GQA
  group (pre-softmax), softmax over the non-window keys, mean over the window queries, then
  max-pooled along the sequence (``kernel``, stride 1);
* redundancy ``r``: cosine similarity ``S`` of the unit keys with a zero diagonal; in each row
  ``i`` the most recent ``j`` with ``S_ij > threshold`` is zeroed (so the newest near-duplicate
  survives); ``r_j = softmax_j(mean_i S_ij)``;
* ``z = mix_lambda * a - (1 - mix_lambda) * r`` (paper/README: lambda 0.1).

Deviations: padding slots are left out of the means and the softmax (the reference assumes
unpadded rows); a row with no similar key zeroes nothing (the reference zeroes ``S_i0``).
Rows of ``S`` are processed in blocks so a long prefill never holds an n x n matrix at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbound.errors import KVBoundError
from kvbound.policies.attention_rows import (
    grouped_logits,
    masked_softmax,
    mean_over_queries,
    pool1d,
    recent_window,
)
from kvbound.policies.base import WindowedPolicy


@dataclass
class RKVPolicy(WindowedPolicy):
    """Pooled attention of the last queries minus key redundancy (arXiv 2505.24133)."""

    name: ClassVar[str] = "rkv"
    kernel: int = 7
    mix_lambda: float = 0.1
    threshold: float = 0.5
    #: rows of the similarity matrix per block
    block: int = 1024

    DEFAULT_WINDOW: ClassVar[int] = 8

    def __post_init__(self) -> None:
        if (self.window is not None and self.window < 1) or self.kernel < 1 or self.block < 1:
            raise KVBoundError("window, kernel and block must be >= 1.")
        if not 0.0 <= self.mix_lambda <= 1.0:
            raise KVBoundError(f"mix_lambda must be in [0, 1], got {self.mix_lambda}.")

    def importance(self, layer, window: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, n) pooled attention of the window queries over the non-window tokens."""
        keys, pos = layer.keys_, layer.positions
        if layer.queries.queries is None:
            return torch.zeros(pos.shape, device=pos.device)
        valid = layer.queries.valid & (layer.queries.pos >= 0)
        logits, allowed = grouped_logits(keys, layer.queries.queries, pos,
                                         layer.queries.pos, valid)
        allowed = allowed & ~window[:, :, None, None, :]  # (B, H_kv, 1, w, n)
        logits = logits.masked_fill(~allowed, -math.inf).amax(2)  # max over the group
        probs = masked_softmax(logits, allowed[:, :, 0])  # (B, H_kv, w, n)
        return pool1d(mean_over_queries(probs, valid), self.kernel, "max")

    def redundancy(self, layer) -> torch.Tensor:
        """(B, H_kv, n) softmax over tokens of their mean cosine similarity to the others."""
        keys = layer.keys_.float()
        valid = layer.positions >= 0
        n = keys.shape[2]
        unit = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)
        idx = torch.arange(n, device=keys.device)
        col_sum = torch.zeros(valid.shape, dtype=torch.float32, device=keys.device)
        for start in range(0, n, self.block):
            stop = min(start + self.block, n)
            sim = torch.matmul(unit[:, :, start:stop], unit.transpose(-1, -2))  # (B, H, r, n)
            keep = valid[:, :, start:stop, None] & valid[:, :, None, :]
            keep = keep & (idx[start:stop, None] != idx[None, :])  # zero diagonal
            sim = sim.masked_fill(~keep, 0.0)
            similar = sim > self.threshold
            last = torch.where(similar, idx, torch.full_like(idx, -1)).amax(-1)  # (B, H, r)
            drop = (idx == last[..., None]) & (last[..., None] >= 0)
            col_sum += sim.masked_fill(drop, 0.0).sum(-2)
        mean = col_sum / valid.sum(-1, keepdim=True).clamp(min=1)
        return masked_softmax(mean.masked_fill(~valid, -math.inf), valid)

    def score(self, layer) -> torch.Tensor:
        window = recent_window(layer, self.window_at(layer.budget))
        z = (self.mix_lambda * self.importance(layer, window)
             - (1.0 - self.mix_lambda) * self.redundancy(layer))
        return z.masked_fill(window, math.inf)
