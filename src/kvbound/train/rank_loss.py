"""Attention-rank objective for retention gates (a kvbound extension, issue 17).

The paper (TRIM-KV, section 3.3) trains the gates by distillation through a soft decay
``beta_i^(t - i)``, while the cache evicts hard: at each step it keeps the top-M retention scores
``s_t(i) = (t - i) log beta_i``. This objective fits that ranking directly to what the frozen
model's own attention says later queries use. For a KV head, a decision time ``t`` (the cache
chooses among the keys ``i < t``) and a horizon ``W``, the future attention mass of key ``i`` is

    F_t(i) = sum_{t' = t}^{t + W - 1} mean_{query heads h of the KV head} A_h[t', i]

(``A`` the model's attention probabilities, no gradient; summed over every 4th query by
default, an estimate at a quarter of the cost). The loss is the listwise cross-entropy
of ListNet (Cao et al., ICML 2007) between ``F_t / sum_i F_t(i)`` and ``softmax_i s_t(i)``,
averaged over decision times every ``stride`` tokens, KV heads and rows: evicting a key costs in
proportion to the attention it would have received, which is what a hard top-M cache loses. The
value reported is the listwise KL (the cross-entropy minus the target's entropy, 0 = a perfect
fit). One forward pass of the frozen model per step; the gradient reaches only the gates.

``scope="layer"`` makes one list of every (KV head, key) pair of the layer at a decision time
(target: each head's future attention, the heads' masses side by side; scores: every head's
``s_t(i)`` in one softmax), the ranking a cache with a budget shared by the layer's heads
(``budget_scope="layer"``) applies. Per-head lists leave the scores of different heads
uncalibrated against each other; one list per layer trains exactly that comparison.
``scope="model"`` goes one step further, for ``budget_scope="global"``: every gated layer's lists
at a decision time are joined into one (:func:`rank_lists` per layer, :func:`join_lists` and
:func:`listnet` over the model), so the layers are calibrated against each other too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvbound.errors import KVBoundError

#: one ListNet list per KV head, per layer (its heads side by side), or per model (all layers)
SCOPES = ("head", "layer", "model")


def _keep_mask(attention_mask: torch.Tensor | None, b: int, t: int,
               device: torch.device) -> torch.Tensor:
    """(B, 1, T, T) boolean: causal and, where given, transformers' keep-mask (padding)."""
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    if attention_mask is None:
        return causal.expand(b, 1, t, t)
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > -1e4  # additive float mask: 0 keeps, -inf/-large drops
    return attention_mask[..., -t:, -t:] & causal


def future_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, keep: torch.Tensor,
                     times: torch.Tensor, horizon: int, query_step: int = 1) -> torch.Tensor:
    """F_t(i) of the module docstring, (B, H_kv, len(times), T), fp32, no gradient.

    With ``query_step`` s > 1 the sum runs over the queries at multiples of s in the window,
    times s (an estimate at 1/s of the cost: the (T x T) attention is the objective's cost)."""
    b, hq, t, _ = query.shape
    hkv = key.shape[1]
    with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
        rows = torch.arange(0, t, query_step, device=query.device)
        k = key.float().repeat_interleave(hq // hkv, dim=1)
        logits = (query.float()[:, :, rows] @ k.transpose(-1, -2)) * scaling
        keep_rows = keep[:, :, rows]
        logits.masked_fill_(~keep_rows, torch.finfo(torch.float32).min)  # finite: no NaN rows
        probs = logits.softmax(-1).view(b, hkv, hq // hkv, len(rows), t).mean(2)
        probs *= keep.diagonal(dim1=-2, dim2=-1)[..., rows, None]  # padding queries use nothing
        cum = torch.cat([torch.zeros_like(probs[..., :1, :]), probs.cumsum(dim=-2)], dim=-2)
        lo = (times + query_step - 1) // query_step  # first sampled query >= t
        hi = ((times + horizon).clamp(max=t) + query_step - 1) // query_step
        return (cum[..., hi, :] - cum[..., lo, :]) * query_step


def attention_rank_loss(query: torch.Tensor, key: torch.Tensor, log_beta: torch.Tensor,
                        scaling: float | None = None, attention_mask: torch.Tensor | None = None,
                        *, horizon: int = 256, stride: int = 16, start: int = 16,
                        query_step: int = 4, scope: str = "head",
                        log_alpha: torch.Tensor | None = None,
                        lists: bool = False) -> tuple[torch.Tensor, float] | RankLists:
    """ListNet loss of the retention ranking against the model's future attention.

    Parameters
    ----------
    query : Tensor (B, Hq, T, d) and key : Tensor (B, Hkv, T, d)
        The layer's post-RoPE queries and keys (no gradient is taken through them).
    log_beta : Tensor (B, Hkv, T)
        The gate's per-token log retention (with gradient).
    attention_mask : Tensor (B, 1, T, T), optional
        transformers' keep-mask (boolean or additive); causal is applied on top.
    horizon, stride, start : int
        ``W`` of the module docstring; decision times ``start, start + stride, ... < T``.
    query_step : int
        Sum the future attention over every ``query_step``-th query (:func:`future_attention`).
    log_alpha : Tensor (B, Hkv, T), optional
        Gates with an initial importance: the scores are ``log_alpha_i + (t - i) log beta_i``.
    scope : str
        ``"head"``: one list per KV head; ``"layer"``: one list of all the layer's heads' keys;
        ``"model"``: this layer's part of one list over every gated layer, returned as
        :class:`RankLists` (no loss yet: :func:`join_lists` then :func:`listnet`).
    lists : bool
        Return this layer's :class:`RankLists` (per head or per layer, as ``scope`` says) instead
        of the loss, for a caller that adds terms over them (:func:`topm_lost_mass`).

    Returns ``(loss, listwise_kl)``: the mean cross-entropy (with gradient to ``log_beta``) and
    the mean KL to the target distribution (a float, 0 when the ranking fits exactly).
    """
    if scope not in SCOPES:
        raise KVBoundError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}.")
    if min(horizon, stride, start, query_step) < 1:
        raise KVBoundError(f"horizon, stride, start and query_step must be >= 1, got {horizon}, "
                           f"{stride}, {start}, {query_step}.")
    b, _, t, d = query.shape
    scaling = d ** -0.5 if scaling is None else float(scaling)
    if start >= t:
        raise KVBoundError(f"sequence of {t} tokens is too short for the first decision time "
                           f"{start}.")
    with torch.autocast(query.device.type, enabled=False):  # fp32 throughout, bf16 run or not
        made = rank_lists(query, key, log_beta, scaling, attention_mask, horizon, stride,
                          start, query_step, per_layer=scope != "head", log_alpha=log_alpha)
        return made if lists or scope == "model" else listnet(made)


def _one_list_per_layer(x: torch.Tensor) -> torch.Tensor:
    """(B, H, n_times, T) -> (B, 1, n_times, H * T): the heads' keys side by side."""
    b, h, n, t = x.shape
    return x.transpose(1, 2).reshape(b, 1, n, h * t)


class RankLists(NamedTuple):
    """One layer's ListNet lists, (B, 1, n_times, K): the future attention of each candidate key
    (0 elsewhere), the scores (-inf elsewhere), the candidates, and (B, 1, n_times) the weight of
    each list (a real decision time with some future attention)."""

    flow: torch.Tensor
    scores: torch.Tensor
    cand: torch.Tensor
    weight: torch.Tensor


def rank_lists(query, key, log_beta, scaling, attention_mask, horizon, stride, start, query_step,
               per_layer: bool, log_alpha: torch.Tensor | None = None) -> RankLists:
    """The lists of one layer: one per KV head and decision time, or (``per_layer``) the heads'
    keys side by side in one list per decision time. ``log_alpha`` (B, Hkv, T): the gates'
    initial importance, added to every score."""
    b, _, t, _ = query.shape
    times = torch.arange(start, t, stride, device=query.device)
    keep = _keep_mask(attention_mask, b, t, query.device)
    flow = future_attention(query, key, scaling, keep, times, horizon, query_step)
    cand = keep[:, :, times, :] & (torch.arange(t, device=query.device) < times[:, None])
    real = keep.diagonal(dim1=-2, dim2=-1)[:, :, times]  # (B, 1, n_times)
    age = (times[:, None] - torch.arange(t, device=query.device)).clamp(min=0).float()
    scores = age * log_beta.float()[:, :, None, :]
    if log_alpha is not None:
        scores = scores + log_alpha.float()[:, :, None, :]
    scores = scores.masked_fill(~cand, float("-inf"))
    cand = cand.expand_as(scores)
    flow = torch.where(cand, flow, 0.0)
    if per_layer:
        flow, scores, cand = map(_one_list_per_layer, (flow, scores, cand))
    weight = (real & (flow.sum(-1) > 0)).float()
    return RankLists(flow, scores, cand, weight)


def join_lists(parts: list[RankLists]) -> RankLists:
    """Several layers' per-layer lists (same rows and decision times) as one list each."""
    flow, scores, cand = (torch.cat(x, dim=-1) for x in zip(*[p[:3] for p in parts],
                                                            strict=True))
    weight = (torch.stack([p.weight for p in parts]).amax(0) > 0) & (flow.sum(-1) > 0)
    return RankLists(flow, scores, cand, weight.float())


def survivors(scores: torch.Tensor, cand: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, 1, J, K) bool: the candidates still resident at each decision time of a cache that cut
    its residents to their top ``keep`` scores at every earlier decision (an evicted key never
    returns), no gradient. Lists are the decision times in order, as :func:`rank_lists` makes
    them."""
    with torch.no_grad():
        alive = torch.zeros_like(cand)
        gone = torch.zeros_like(cand[..., 0, :])
        for j in range(cand.shape[-2]):
            here = cand[..., j, :] & ~gone
            alive[..., j, :] = here
            over = here.sum(-1, keepdim=True) > keep
            if not over.any():
                continue
            s = scores[..., j, :].detach().masked_fill(~here, float("-inf"))
            kept = torch.zeros_like(here).scatter_(-1, s.topk(keep, dim=-1).indices, True)
            gone |= here & ~kept & over
        return alive


def topm_lost_mass(lists: RankLists, keep: int, tau: float = 1.0, sequential: bool = False,
                   relative: bool = False) -> tuple[torch.Tensor, float]:
    """The future attention a top-``keep`` cut of each list throws away, made differentiable.

    ListNet weighs every key by its share of the future attention, so most of its gradient goes
    to the few keys that take most of it (sinks, the newest tokens), which any cache keeps; what a
    cache of budget M decides is the order around its M-th key. This term looks only there: with
    ``theta`` the midpoint of the ``keep``-th and ``keep + 1``-th scores, key ``i``
    counts as evicted with weight ``sigmoid((theta - s_i) / tau)``, and the loss is the attention
    share of the evicted keys (soft top-k; DMS and the official eviction-aware variants use the
    same relaxation). ``theta`` keeps its gradient, so the loss is shift-invariant like the
    ranking itself (raising every score changes nothing; with a fixed ``theta`` it would push every
    score up). Lists with at most ``keep`` candidates lose nothing and are left out.
    ``sequential``: the candidates of each decision are only the keys that survived the earlier
    hard cuts by the same scores (:func:`survivors`), as in a cache, where a score that ranks a
    key high only after it was evicted is worth nothing; the share stays relative to the
    attention of all keys (what was evicted before is lost, with no gradient).
    ``relative``: ``tau`` is a fraction of each list's score spread (the standard deviation of its
    candidates' scores, no gradient) rather than score units, so the loss cannot fall by scaling
    every score up, which leaves the cut where it is.
    Returns ``(loss, hard_lost)``: the soft loss (with gradient) and the share a hard cut loses.
    """
    flow, scores, cand, weight = lists
    k = scores.shape[-1]
    if keep >= k:
        return scores.new_zeros(()), 0.0
    target = flow / flow.sum(-1, keepdim=True).clamp_min(1e-30)
    if sequential:
        cand = survivors(scores, cand, keep)
        scores = scores.masked_fill(~cand, float("-inf"))
    top = scores.topk(keep + 1, dim=-1).values
    theta = 0.5 * (top[..., keep - 1] + top[..., keep])
    used = weight * (cand.sum(-1) > keep) * torch.isfinite(theta)
    theta = torch.where(torch.isfinite(theta), theta, 0.0)[..., None]
    finite = torch.where(cand, scores, 0.0)
    if relative:
        n = cand.sum(-1, keepdim=True).clamp_min(1)
        mean = finite.detach().sum(-1, keepdim=True) / n
        var = (torch.where(cand, finite.detach() - mean, 0.0) ** 2).sum(-1, keepdim=True) / n
        tau = tau * var.sqrt().clamp_min(1e-6)
    evicted = torch.where(cand, torch.sigmoid((theta - finite) / tau), 0.0)
    norm = used.sum().clamp_min(1.0)
    loss = ((target * evicted).sum(-1) * used).sum() / norm
    hard = ((target * (cand & (finite < theta)).float()).sum(-1) * used).sum() / norm
    return loss, float(hard)


def listnet(lists: RankLists) -> tuple[torch.Tensor, float]:
    """ListNet cross-entropy (with gradient) and listwise KL (a float) of weighted lists."""
    flow, scores, cand, weight = lists
    target = flow / flow.sum(-1, keepdim=True).clamp_min(1e-30)
    logp = scores.log_softmax(-1).masked_fill(~cand, 0.0)
    ce = -(target * logp).sum(-1)
    entropy = -(target * torch.where(target > 0, target.log(), 0.0)).sum(-1)
    norm = weight.sum().clamp_min(1.0)
    loss = (ce * weight).sum() / norm
    kl = float(((ce - entropy).detach() * weight).sum() / norm)
    return loss, kl
