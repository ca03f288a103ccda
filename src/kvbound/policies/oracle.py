"""Future-attention oracle: an eviction score that knows what the full model will attend to.

Not a method users can run (it reads the future); a reference for evaluation only. At a decision
time ``t`` it scores each resident key ``i`` by the attention the full-cache model's later queries
give it, ``F_t(i) = sum_{t' = t}^{t + W - 1} mean_{query heads of the KV head} A[t', i]`` (the
target the attention-rank objective trains the gates on, :mod:`kvbound.train.rank_loss`), with
``W`` the horizon (the rest of the text by default). A learned score that ranks tokens once, when
they are created, can at best approach it, so its KL bounds what better gates could gain under
the same cache rules (budget, buffer, sinks): ``benchmarks/oracle_headroom.py``. It is a strong
heuristic bound, not the optimum: the optimal set under a budget is combinatorial, and the
bounded cache's own attention drifts from the full model's.

The tables come from :func:`kvbound.eval.oracle.future_attention_tables` for the very token ids
the cache is fed (no padding); decision times between two tabled times use the next one.

:class:`FittedRetentionOracle` asks a narrower question: how good can a score of TRIM-KV's form,
``(t - i) log beta_i`` fixed when token ``i`` is created, be at best? Its per-token ``log beta``
are fitted to the same future-attention tables (:func:`kvbound.eval.oracle.fit_retention`), so
its KL is the ceiling of any retention gate, however large or well trained, under the same rules;
``offset`` adds a second per-token number, ``a_i + (t - i) log beta_i``, the next richer form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvbound.errors import KVBoundError
from kvbound.policies.base import Policy


@dataclass
class FutureAttentionOracle(Policy):
    """Keep the tokens the full model's future queries attend to most (evaluation only)."""

    name: ClassVar[str] = "oracle"
    #: layer index -> (B, H_kv, J, T) future attention at decision times 0, stride, 2 stride, ...
    tables: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    #: tokens between two tabled decision times
    stride: int = 16
    #: the tables' horizon W (None: the rest of the text), recorded in results
    horizon: int | None = None

    def score(self, layer) -> torch.Tensor:
        table = self.tables.get(layer.layer_idx)
        if table is None:
            raise KVBoundError(f"The oracle has no future-attention table for layer "
                               f"{layer.layer_idx}: build it from the ids this cache is fed.")
        b, h, _, t_max = table.shape
        pos = layer.positions  # (B, H, n), -1 = padding (the cache scores it -inf anyway)
        if pos.shape[0] != b or pos.shape[1] != h:
            raise KVBoundError(f"The oracle's tables hold {b} rows x {h} KV heads; the cache "
                               f"holds {pos.shape[0]} x {pos.shape[1]}.")
        seen = layer.row_seen  # (B,) the next token's position = the decision time
        if int(seen.max()) > t_max:  # one host read per eviction: evaluation only
            raise KVBoundError(f"The oracle's tables cover {t_max} tokens; the cache has seen "
                               f"{int(seen.max())}: build them from the ids this cache is fed.")
        j = (seen + self.stride - 1) // self.stride  # < J: the tables end at time T
        rows = table[torch.arange(b, device=table.device), :, j]  # (B, H, T)
        return rows.gather(-1, pos.clamp(min=0)).float()

    def describe(self) -> dict:
        return {"policy": self.name, "stride": self.stride, "horizon": self.horizon}


@dataclass
class FittedRetentionOracle(Policy):
    """TRIM-KV's score with per-token ``log beta`` fitted to the future (evaluation only)."""

    name: ClassVar[str] = "oracle-fit"
    #: layer index -> (B, H_kv, T) fitted log beta of every position of the text
    log_beta: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    #: layer index -> (B, H_kv, T) fitted offsets ``a_i`` (empty: the plain TRIM-KV form)
    offset: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    #: what the fit was made for, recorded in results
    fit: dict = field(default_factory=dict)

    def score(self, layer) -> torch.Tensor:
        lb = self.log_beta.get(layer.layer_idx)
        if lb is None:
            raise KVBoundError(f"The fitted oracle has no log beta for layer {layer.layer_idx}.")
        pos = layer.positions
        if pos.shape[:2] != lb.shape[:2] or int(layer.row_seen.max()) > lb.shape[-1]:
            raise KVBoundError(f"The fitted oracle holds {tuple(lb.shape)} (rows, KV heads, "
                               f"tokens); the cache has {tuple(pos.shape[:2])} and has seen "
                               f"{int(layer.row_seen.max())} tokens: fit it on the ids this "
                               "cache is fed.")
        idx = pos.clamp(min=0)
        age = (layer.row_seen.view(-1, 1, 1) - pos).float()
        score = age * lb.gather(-1, idx)
        if self.offset:
            score = score + self.offset[layer.layer_idx].gather(-1, idx)
        return score

    def describe(self) -> dict:
        return {"policy": self.name, **self.fit}
