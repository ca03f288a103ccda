"""The student/teacher log-beta hand-off of gate training.

In training the attention pre-hook (:mod:`kvbound.hooks`) does not touch a cache: it computes the
layer's log beta with the retention gate (student pass) or ``None`` (teacher pass, the frozen
model's plain attention) and leaves it in a side channel on the attention module, which the
registered attention function ``"kvbound_retention"`` (:mod:`kvbound.train.attention`) reads.
"""

from __future__ import annotations

import torch
from torch import nn

#: key of the side channel in ``module.__dict__`` (never a registered buffer or parameter)
LOG_BETA_ATTR = "_kvbound_log_beta"
#: the eviction-aware training knobs of this forward (``retention_attention`` keyword arguments)
EVICT_ATTR = "_kvbound_evict"
#: the attention-rank objective's settings of this forward (:mod:`kvbound.train.rank_loss`)
RANK_ATTR = "_kvbound_rank"
#: where the attention function leaves the layer's attention-rank loss
RANK_LOSS_ATTR = "_kvbound_rank_loss"


def hand_off(module: nn.Module, mode: str, gates: nn.Module | None, hidden: torch.Tensor,
             train_sinks: int = 0, evict: dict | None = None, rank: dict | None = None) -> None:
    """Leave this forward's log beta (B, H_kv, T) on ``module``: the gate's in ``"student"``
    and ``"rank"`` modes (the first ``train_sinks`` tokens protected: log beta 0), ``None`` in
    ``"teacher"``; ``evict`` (``{"evict_budget": M, "evict_tau": tau}``) turns on eviction-aware
    attention; in ``"rank"`` mode the model attends as the teacher and the attention function
    scores the gate's ranking against it (``rank``: the keyword arguments of
    :func:`kvbound.train.rank_loss.attention_rank_loss`)."""
    log_beta = log_alpha = None
    layer_idx = module.layer_idx
    module.__dict__.pop(RANK_LOSS_ATTR, None)
    if mode in ("student", "rank") and gates is not None and layer_idx in gates:
        positions = None
        if getattr(gates, "uses_positions", False):  # right-padded batches: 0..T-1 per row
            positions = torch.arange(hidden.shape[1], device=hidden.device).expand(
                hidden.shape[0], -1)
        outputs = gates.retention(layer_idx, hidden, positions)
        log_beta, log_alpha = outputs["log_beta"], outputs.get("log_alpha")
        if train_sinks:
            log_beta = log_beta.clone()
            log_beta[..., :train_sinks] = 0.0
    if mode == "rank":
        module.__dict__[LOG_BETA_ATTR] = None  # the model attends as the frozen teacher
        settings = dict(rank or {})
        if log_alpha is not None:  # gates with an initial importance: scored with log beta
            settings["log_alpha"] = log_alpha
        module.__dict__[RANK_ATTR] = (log_beta, settings) if log_beta is not None else None
        module.__dict__[EVICT_ATTR] = {}
        return
    module.__dict__[RANK_ATTR] = None
    module.__dict__[LOG_BETA_ATTR] = log_beta
    module.__dict__[EVICT_ATTR] = dict(evict or {}) if log_beta is not None else {}


def log_beta_of(module: nn.Module) -> torch.Tensor | None:
    """The log beta the pre-hook left for this forward (``None``: plain attention)."""
    return module.__dict__.get(LOG_BETA_ATTR)


def evict_of(module: nn.Module) -> dict:
    """Eviction-aware keyword arguments for this forward (empty: the paper's soft decay only)."""
    return module.__dict__.get(EVICT_ATTR) or {}


def rank_of(module: nn.Module) -> tuple[torch.Tensor, dict] | None:
    """``(log_beta, settings)`` when this forward scores the gate's ranking (``"rank"`` mode)."""
    return module.__dict__.get(RANK_ATTR)


def rank_loss_of(module: nn.Module):
    """What the attention function left for this forward's attention-rank objective: the
    layer's :class:`~kvbound.train.rank_loss.RankLists` (the trainer asks for lists) or
    ``(loss, listwise_kl)``."""
    return module.__dict__.get(RANK_LOSS_ATTR)


def clear(module: nn.Module) -> None:
    for attr in (LOG_BETA_ATTR, EVICT_ATTR, RANK_ATTR, RANK_LOSS_ATTR):
        module.__dict__.pop(attr, None)
