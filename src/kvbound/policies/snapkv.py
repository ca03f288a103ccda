"""SnapKV (Li et al., arXiv 2404.14469): observation-window voting with 1-D pooling.

For each query head, the attention rows of the last ``window`` queries (causal, fp32 softmax over
every resident key) are averaged over the window; the prefix (non-window) part is pooled along
the sequence (stride 1, ``kernel // 2`` padding); the pooled scores are averaged over the GQA group
(kvpress's order and reduction, never the per-query-head ``repeat_kv`` layout). The window's own
tokens are always kept, inside M. Defaults are the paper's experiment configs: window 32,
kernel 7, max pooling (the official code default is kernel 5 avg; kvpress 64 / 5 / avg). Unless
the user sets ``window``, it is ``min(32, M // 2)`` for a budget-M cache: a window as large as M
would keep only the window (the last M tokens), leaving nothing to select.

``query_aware`` only labels results: whether the question is in the prompt (so the observation
window sees it) is decided by the evaluation harness, not here.

Pooled budgets (``budget_scope`` "layer"/"global", AdaKV's setting, arXiv 2407.11550): the
cache scores a per-head view of the packed slots, so each head's scores are its own attention
distribution, pooled along its own tokens, and one top-k compares them across heads.
Deviation: the paper compresses once after the prompt; in this cache it also runs whenever the
cache fills during decoding (pooling over resident slots), as R-KV's and kvpress's decode
variants do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbound.errors import KVBoundError
from kvbound.policies.attention_rows import mean_over_queries, pool1d, recent_probs, recent_window
from kvbound.policies.base import WindowedPolicy


@dataclass
class SnapKVPolicy(WindowedPolicy):
    """Pooled attention of the last ``window`` queries; window kept (arXiv 2404.14469)."""

    name: ClassVar[str] = "snapkv"
    kernel: int = 7
    pooling: str = "max"
    #: label only: the question is part of the prompt the window sees
    query_aware: bool = False

    DEFAULT_WINDOW: ClassVar[int] = 32

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise KVBoundError(f"window must be >= 1, got {self.window}.")
        if self.kernel < 1:
            raise KVBoundError(f"kernel must be >= 1, got {self.kernel}.")
        if self.pooling not in ("max", "avg"):
            raise KVBoundError(f"pooling must be 'max' or 'avg', got {self.pooling!r}.")

    def score(self, layer) -> torch.Tensor:
        probs, valid = recent_probs(layer)  # (B, H_kv, g, w, n)
        window = recent_window(layer, self.window_at(layer.budget))
        attn = mean_over_queries(probs, valid)  # zeros while no query is buffered
        attn = attn.masked_fill(window[:, :, None], 0.0)  # pool the prefix only
        scores = pool1d(attn, self.kernel, self.pooling).mean(2)
        return scores.masked_fill(window, math.inf)
