"""Shared helpers of the attention-based policies: a few attention rows, recomputed in fp32.

The model's own attention runs on whatever kernel it uses (SDPA, FlashAttention); the policies
that need attention weights recompute only the rows they read, ``softmax(q K^T / sqrt(d))`` over
the resident keys, from the post-RoPE queries the hook hands them. Everything is laid out per
KV head with the GQA group as its own axis: query head ``h`` belongs to KV head ``h // g``.

Masking: padding slots (position < 0) are never attended; a query at position ``p`` sees only
keys at positions ``<= p`` (causality inside a prefill chunk); padding queries give all-zero rows.

Pooled layers (``budget_scope`` "layer"/"global": the KV heads packed on one slot axis) are read
through :func:`layer_probs`: every query head attends only to its own KV head's slots, so each
head's attention is a distribution over its own tokens and the scores of different heads (and
layers) are masses of the same kind, comparable in one top-k: the normalisation of AdaKV
(Feng et al., arXiv 2407.11550).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def grouped_logits(
    keys: torch.Tensor,
    queries: torch.Tensor,
    key_pos: torch.Tensor,
    query_pos: torch.Tensor,
    query_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled logits (B, H_kv, g, w, n) fp32 and the boolean mask of allowed entries.

    keys (B, H_kv, n, d); queries (B, H_q, w, d); key_pos (B, H_kv, n); query_pos (B, w);
    query_valid (B, w) or None (then ``query_pos >= 0``). Masked entries hold ``-inf``.
    """
    b, h_kv, n, d = keys.shape
    h_q, w = queries.shape[1], queries.shape[2]
    g = h_q // h_kv
    q = queries.float().reshape(b, h_kv, g, w, d)
    k = keys.float()[:, :, None]  # (B, H_kv, 1, n, d)
    logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
    if query_valid is None:
        query_valid = query_pos >= 0
    allowed = (
        (key_pos[:, :, None, :] >= 0)
        & (key_pos[:, :, None, :] <= query_pos[:, None, :, None])
        & query_valid[:, None, :, None]
    )[:, :, None]  # (B, H_kv, 1, w, n)
    return logits.masked_fill(~allowed, -math.inf), allowed


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; rows with nothing allowed become zeros (not NaN)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.where(allowed, probs.nan_to_num(0.0), torch.zeros((), dtype=probs.dtype))


def grouped_probs(
    keys: torch.Tensor,
    queries: torch.Tensor,
    key_pos: torch.Tensor,
    query_pos: torch.Tensor,
    query_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities (B, H_kv, g, w, n) fp32 of ``queries`` over the resident keys."""
    logits, allowed = grouped_logits(keys, queries, key_pos, query_pos, query_valid)
    return masked_softmax(logits, allowed)


def layer_probs(layer, queries: torch.Tensor, query_pos: torch.Tensor,
                query_valid: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`grouped_probs` of ``queries`` over the layer's resident keys. A pooled layer (keys
    (B, 1, n, d), each slot of one KV head) gives (B, 1, H_q, w, n), each query head's row a
    distribution over the slots of its own KV head."""
    keys, pos = layer.keys_, layer.positions
    slot_heads = getattr(layer, "slot_heads", None)  # (B, n) in pooled layers
    if slot_heads is None:
        return grouped_probs(keys, queries, pos, query_pos, query_valid)
    logits, allowed = grouped_logits(keys, queries, pos, query_pos, query_valid)
    h_q = queries.shape[1]
    head_of_query = torch.arange(h_q, device=keys.device) // (h_q // layer.kv_heads)
    own = slot_heads[:, None, None, None, :] == head_of_query[None, None, :, None, None]
    allowed = allowed & own  # (B, 1, H_q, w, n)
    return masked_softmax(logits.masked_fill(~allowed, -math.inf), allowed)


def recent_probs(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention rows of the layer's buffered recent queries.

    Returns probs (B, H_kv, g, w, n) (pooled layers: (B, 1, H_q, w, n), see
    :func:`layer_probs`) and query validity (B, w); zeros (and no valid query) if no query was
    buffered yet.
    """
    keys = layer.keys_
    if layer.queries.queries is None:
        b, h_kv, n, _ = keys.shape
        empty = torch.zeros(b, h_kv, 1, 0, n, device=keys.device)
        return empty, torch.zeros(b, 0, dtype=torch.bool, device=keys.device)
    valid = layer.queries.valid & (layer.queries.pos >= 0)
    return layer_probs(layer, layer.queries.queries, layer.queries.pos, valid), valid


def mean_over_queries(rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the query axis (-2) of (B, H, [g,] w, n) rows, counting only valid queries."""
    count = valid.sum(-1).clamp(min=1).to(rows.dtype)
    count = count.view(-1, *([1] * (rows.dim() - 1)))
    return rows.sum(-2) / count.squeeze(-1)


def recent_window(layer, w: int) -> torch.Tensor:
    """(B, H_kv, n) bool: resident real tokens among the row's last ``w`` real tokens.

    These are the tokens of the observation window (the last ``w`` queries) whenever the layer
    buffers the last ``w`` queries: rows are left-padded, so padding only precedes real tokens.
    """
    pos = layer.positions
    return (pos >= 0) & (pos >= layer.row_seen.view(-1, 1, 1) - w)


def pool1d(scores: torch.Tensor, kernel: int, mode: str) -> torch.Tensor:
    """Stride-1 pooling along the last axis with ``kernel // 2`` padding; same length out.

    ``avg`` counts the zero padding (``count_include_pad``), as SnapKV and kvpress do; ``max``
    pads with -inf. Scores are attention masses (>= 0), so zeros in masked slots are neutral.
    """
    if kernel <= 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    pad = kernel // 2
    if mode == "max":
        out = F.max_pool1d(flat, kernel_size=kernel, stride=1, padding=pad)
    else:
        out = F.avg_pool1d(flat, kernel_size=kernel, stride=1, padding=pad)
    return out[..., : shape[-1]].reshape(shape)
