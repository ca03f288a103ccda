"""Retention-gated attention for training TRIM-KV gates (METHOD.md section 3).

For a query at absolute position ``t`` and a key at position ``i <= t`` the logit is::

    q_t . k_i * scaling + (t - i) * log_beta[b, h // group, i]

followed by a causal softmax and the product with ``V``. ``log_beta`` is the per-token, per-KV-head
output of the retention gate (``<= 0``); all zeros gives ordinary causal attention. The log-decay is
*added* to the scaled logits (equivalently ``beta ** (t - i)`` multiplies ``exp(logit)``).

Eviction-aware training (a kvbound extension, issue 17): with ``evict_budget=M`` the logit also
gets ``log sigmoid((s_ti - theta_t) / tau_t)`` where ``s_ti = (t - i) * log_beta_i`` is the cache's
retention score and ``theta_t`` the M-th largest score among the keys ``<= t`` of that KV head
(no gradient): keys the cache would have evicted at ``t`` are (softly) masked out, as at inference,
and the gate gets a gradient to raise the score of an evicted key the output needed. The soft decay
alone barely penalises a partly decayed attention sink that hard top-M eviction throws out.
``tau_t = tau * |theta_t|`` by default (``evict_scale="relative"``): with a fixed temperature
(``"absolute"``) the student can soften the mask, and so escape eviction, by shrinking every
retention score together (a layer whose gate keeps everything sees no eviction at all); relative
to the threshold's magnitude the mask depends only on the scores' ratios, as the cache's ranking.
``evict_decay=False`` drops the paper's soft decay from the student's logits and keeps only the
eviction mask: the student then attends exactly as the cache does (no decay at inference), up to
the softness of the mask.

Three implementations share one entry point, :func:`retention_attention`:

``"blockwise"`` (default)
    A custom :class:`torch.autograd.Function` in the style of FlashAttention: queries are processed
    in blocks of ``block_size`` rows against the keys up to the end of the block (causal); only the
    output and the per-row log-sum-exp are saved, and the backward recomputes the scores block by
    block. Saved memory is O(T); the transient memory is one block of scores. Bias, softmax and
    reductions are fp32; the matmuls run in the compute dtype (bf16 under autocast). Gradients flow
    to query, key, value and ``log_beta``.
``"sdpa"``
    ``scaled_dot_product_attention`` over query blocks with a per-block additive bias (built in
    fp32, cast to the compute dtype, so rounded to bf16 under autocast), each block wrapped in
    non-reentrant gradient checkpointing. A bias that needs grad sends SDPA to its math kernel.
``"flex"``
    ``torch.compile(flex_attention)`` with a ``score_mod``. Forward only on CPU: torch 2.13 raises
    for FlexAttention backward on CPU whenever query/key/value need grad. The first call per shape
    compiles (3-10 s on CPU). Meant for CUDA, where the official code trains with it.

Measured with ``benchmarks/bench_attention.py`` (B=1, Hq=9, Hkv=3, d=64, 1 thread, forward +
backward, T=4096): blockwise 0.50-0.53 s bf16 / 0.97-1.03 s fp32 with 70-110 MB peak; sdpa
1.7 s / 1.5 s with ~250 MB; naive 5.1 s / 5.6 s with ~2 GB; plain causal SDPA without any bias
0.61 s / 0.79 s. Flex forward-only was slower than blockwise forward (0.46 vs 0.19 s bf16) and used
more memory. Hence ``"blockwise"`` with 128-row blocks is the default.

:func:`register_retention_attention` registers the function ``"kvbound_retention"`` with
transformers (attention + mask interfaces). A layer uses retention-gated attention when its
attention module carries a tensor ``module._kvbound_log_beta`` of shape ``(B, H_kv, T_k)``; when
that attribute is missing or ``None`` the function is plain SDPA (the teacher pass). Optional
per-module knobs: ``module._kvbound_block_size`` (int) and ``module._kvbound_attention_impl``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kvbound.errors import KVBoundError
from kvbound.train.gating import RANK_LOSS_ATTR, evict_of, log_beta_of, rank_of

__all__ = [
    "ATTENTION_NAME",
    "DEFAULT_BLOCK_SIZE",
    "eviction_threshold",
    "row_temperature",
    "naive_retention_attention",
    "register_retention_attention",
    "retention_attention",
    "kvbound_attention_forward",
]

ATTENTION_NAME = "kvbound_retention"
DEFAULT_BLOCK_SIZE = 128

Impl = Literal["blockwise", "sdpa", "flex"]


# --------------------------------------------------------------------------------------------------
# validation and small helpers


def _check_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_beta: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> tuple[int, int, int, int, int]:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise KVBoundError(
            "retention_attention expects query (B, Hq, Tq, d) and key/value (B, Hkv, Tk, d); got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    b, hq, tq, _ = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    if key.shape[:3] != value.shape[:3] or key.shape[0] != b or key.shape[-1] != query.shape[-1]:
        raise KVBoundError(
            f"key {tuple(key.shape)} / value {tuple(value.shape)} do not match query "
            f"{tuple(query.shape)}"
        )
    if hq % hkv != 0:
        raise KVBoundError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if tq > tk:
        raise KVBoundError(f"query length {tq} exceeds key length {tk}")
    if tuple(log_beta.shape) != (b, hkv, tk):
        raise KVBoundError(
            f"log_beta must have shape (B, H_kv, T_k) = {(b, hkv, tk)}, got {tuple(log_beta.shape)}"
        )
    if attention_mask is not None:
        m = attention_mask
        if m.dim() != 4 or m.shape[0] not in (1, b) or m.shape[1] != 1 or m.shape[2:] != (tq, tk):
            raise KVBoundError(
                "attention_mask must be 4-D and broadcastable to (B, 1, Tq, Tk) = "
                f"{(b, 1, tq, tk)} (a boolean keep-mask or an additive float mask); got "
                f"{tuple(m.shape)}. Expand 2-D padding masks first (e.g. with "
                "transformers.masking_utils.sdpa_mask)."
            )
    return b, hq, hkv, tq, tk


def _compute_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)


def _additive(mask_block: torch.Tensor | None) -> torch.Tensor | None:
    """Convert a (slice of a) bool keep-mask or additive mask to an additive fp32 mask."""
    if mask_block is None:
        return None
    if mask_block.dtype == torch.bool:
        zero = torch.zeros((), dtype=torch.float32, device=mask_block.device)
        return torch.where(mask_block, zero, float("-inf"))
    return mask_block.float()


def _distance(q0: int, n: int, kend: int, device: torch.device) -> torch.Tensor:
    """(n, kend) fp32 matrix of t - i for absolute query positions q0..q0+n-1 and keys 0..kend-1."""
    t = torch.arange(q0, q0 + n, device=device, dtype=torch.float32)
    i = torch.arange(kend, device=device, dtype=torch.float32)
    return t[:, None] - i[None, :]


def _bias(
    dist: torch.Tensor, log_beta: torch.Tensor, mask_block: torch.Tensor | None
) -> torch.Tensor:
    """fp32 bias (B, Hkv, n, kend): (t-i)*log_beta_i, -inf above the diagonal, plus the mask.

    ``mask_block`` is (b, 1, n, kend) and broadcasts over the KV heads.
    """
    bias = dist * log_beta[:, :, None, :]
    bias = bias.masked_fill(dist < 0, float("-inf"))
    add = _additive(mask_block)
    if add is not None:
        bias = bias + add
    return bias


def eviction_threshold(
    log_beta: torch.Tensor, budget: int, tq: int, mask: torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """(B, Hkv, Tq) fp32: for each query ``t`` the ``budget``-th largest retention score
    ``(t - i) * log_beta_i`` over the admissible keys ``i <= t`` (``-inf`` while ``t`` has at most
    ``budget`` keys: nothing evicted yet). Queries are the last ``Tq`` positions. No gradient."""
    b, hkv, tk = log_beta.shape
    offset = tk - tq
    out = torch.full((b, hkv, tq), float("-inf"), dtype=torch.float32, device=log_beta.device)
    lb = log_beta.detach().float()
    with torch.no_grad():
        for s in range(0, tq, block_size):
            e = min(s + block_size, tq)
            kend = offset + e
            if kend <= budget:
                continue
            bias = _bias(_distance(offset + s, e - s, kend, lb.device), lb[:, :, :kend],
                         None if mask is None else mask[:, :, s:e, :kend])
            kth = bias.topk(budget, dim=-1).values[..., -1]
            # rows with at most `budget` admissible keys keep all of them
            admissible = torch.isfinite(bias).sum(-1)
            out[:, :, s:e] = kth.masked_fill(admissible <= budget, float("-inf"))
    return out


def row_temperature(theta: torch.Tensor, tau: float, scale: str = "relative") -> torch.Tensor:
    """Per-query temperature (B, Hkv, Tq): ``tau * |theta_t|`` ("relative") or ``tau``
    ("absolute"); rows with nothing to evict (``theta = -inf``) get ``tau``."""
    if scale not in ("relative", "absolute"):
        raise KVBoundError(f"evict_scale must be 'relative' or 'absolute', got {scale!r}")
    if scale == "absolute":
        return torch.full_like(theta, tau)
    rows = tau * theta.abs().clamp_min(1e-6)
    return torch.where(torch.isfinite(theta), rows, torch.full_like(theta, tau))


def _evict_term(score: torch.Tensor, theta: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """log sigmoid((score - theta) / tau), theta and tau (..., n) broadcast over the keys."""
    return F.logsigmoid((score - theta[..., None]) / tau[..., None])


# --------------------------------------------------------------------------------------------------
# reference


def naive_retention_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_beta: torch.Tensor,
    scaling: float | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    evict_budget: int | None = None,
    evict_tau: float = 0.5,
    evict_scale: str = "relative",
    evict_decay: bool = True,
) -> torch.Tensor:
    """Reference retention-gated attention materialising the full (B, Hq, Tq, Tk) scores.

    Same contract as :func:`retention_attention`; for tests and small shapes only. Computes in fp32
    (fp64 for fp64 inputs). Rows with no admissible key return zeros.
    """
    theta = None
    if evict_budget is not None:
        theta = eviction_threshold(log_beta, evict_budget, query.shape[2], attention_mask)
        tau = row_temperature(theta, evict_tau, evict_scale)
    b, hq, hkv, tq, tk = _check_inputs(query, key, value, log_beta, attention_mask)
    group = hq // hkv
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    dt = torch.promote_types(query.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    q, k, v = query.to(dt), key.to(dt), value.to(dt)
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    lb = log_beta.to(dt).repeat_interleave(group, dim=1)  # (B, Hq, Tk)
    offset = tk - tq
    t = torch.arange(tq, device=q.device)[:, None] + offset
    i = torch.arange(tk, device=q.device)[None, :]
    dist = (t - i).to(dt)  # (Tq, Tk)
    retention = dist * lb[:, :, None, :]
    scores = (q @ k.transpose(-1, -2)) * scaling
    if theta is None or evict_decay:
        scores = scores + retention
    if theta is not None:
        scores = scores + _evict_term(retention, theta.to(dt).repeat_interleave(group, dim=1),
                                      tau.to(dt).repeat_interleave(group, dim=1))
    scores = scores.masked_fill(dist < 0, float("-inf"))
    add = _additive(attention_mask)
    if add is not None:
        scores = scores + add
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)  # rows where every key is masked
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return (probs @ v).to(query.dtype)


# --------------------------------------------------------------------------------------------------
# "blockwise": custom autograd function, O(T) saved memory


class _Workspace:
    """Buffers reused by every query block of one call.

    Allocating fresh block-sized tensors (tens of MB) for each block is slow on CPU: glibc serves
    them with mmap, so every block page-faults its memory in again. Writing into preallocated
    buffers (``out=`` / in-place ops) removed most of the non-matmul time in the benchmark.
    """

    def __init__(self, numels_f32, numels_c, cdt, device):
        self.f32 = [torch.empty(n, dtype=torch.float32, device=device) for n in numels_f32]
        self.c = [torch.empty(n, dtype=cdt, device=device) for n in numels_c]

    @staticmethod
    def view(buf: torch.Tensor, *shape: int) -> torch.Tensor:
        return buf[: math.prod(shape)].view(shape)


def _make_workspace(b, hkv, group, tq, tk, block_size, cdt, device, backward):
    n = min(block_size, tq)
    scores = b * hkv * group * n * tk
    numels_f32 = [scores, b * hkv * n * tk, n * tk] + ([scores] if backward else [])
    numels_c = [] if cdt == torch.float32 else [scores] * (2 if backward else 1)
    return _Workspace(numels_f32, numels_c, cdt, device)


def _bmm(a: torch.Tensor, b: torch.Tensor, ws: _Workspace, idx: int, f32_idx: int) -> torch.Tensor:
    """a @ b written into fp32 workspace buffer ``f32_idx`` (via compute-dtype buffer ``idx``)."""
    shape = (a.shape[0], a.shape[1], b.shape[2])
    out = ws.view(ws.f32[f32_idx], *shape)
    if a.dtype == torch.float32:
        torch.bmm(a, b, out=out)
    else:
        tmp = ws.view(ws.c[idx], *shape)
        torch.bmm(a, b, out=tmp)
        out.copy_(tmp)
    return out


def _as_compute(x: torch.Tensor, cdt: torch.dtype, ws: _Workspace, idx: int) -> torch.Tensor:
    """``x`` (fp32 workspace tensor) in the compute dtype, reusing buffer ``idx``."""
    if cdt == torch.float32:
        return x
    return ws.view(ws.c[idx], *x.shape).copy_(x)


def _exp_(x: torch.Tensor) -> torch.Tensor:
    """In-place exp of (max-subtracted, so <= 0) scores.

    Inputs below -87 are clamped first: their exp is < 1.7e-38, i.e. zero at fp32 precision next to
    the row maximum (exp(0) = 1), and torch's vectorised exp takes a ~10x slower path for very
    negative or -inf inputs, which dominate long-context retention scores.
    """
    return x.clamp_(min=-87.0).exp_()


def _block_scores(ws, qg, key3, log_beta, mask, scaling, s, e, offset, evict=None):
    """fp32 scores of query block [s, e) incl. bias, as (B*Hkv, G*n, kend) in workspace 0.

    Also returns the block's queries (B*Hkv, G*n, d), the distance matrix t - i (n, kend) and,
    with ``evict = (theta, tau, decay)`` (both per query row), the factor ``1 + sigmoid(-z) / tau``
    (``sigmoid(-z) / tau`` without the decay term) (B, Hkv, n, kend) by which the bias scales the
    gradient of the retention score (else ``None``).
    """
    b, hkv, group, _, d = qg.shape
    n, kend = e - s, offset + e
    q_blk = qg[:, :, :, s:e].reshape(b * hkv, group * n, d)
    scores = _bmm(q_blk, key3[:, :kend].transpose(1, 2), ws, 0, 0)
    scores.mul_(scaling)
    dist = ws.view(ws.f32[2], n, kend)
    t = torch.arange(offset + s, offset + e, device=qg.device, dtype=torch.float32)
    i = torch.arange(kend, device=qg.device, dtype=torch.float32)
    torch.sub(t[:, None], i[None, :], out=dist)
    bias = ws.view(ws.f32[1], b, hkv, n, kend)
    torch.mul(dist, log_beta[:, :, None, :kend], out=bias)
    factor = None
    if evict is not None:
        theta, tau, decay = evict
        tau_blk = tau[:, :, s:e, None]
        z = (bias - theta[:, :, s:e, None]).div_(tau_blk)
        factor = torch.sigmoid(-z).div_(tau_blk)
        if decay:
            factor.add_(1.0)
            bias.add_(F.logsigmoid(z))
        else:  # the mask alone, as the cache attends
            bias.copy_(F.logsigmoid(z))
    above = torch.ones(n, n, dtype=torch.bool, device=qg.device).triu_(1)
    bias[..., kend - n :].masked_fill_(above, float("-inf"))
    if mask is not None:
        mask_blk = mask[:, :, s:e, :kend]
        if mask_blk.dtype == torch.bool:
            bias.masked_fill_(~mask_blk, float("-inf"))
        else:
            bias.add_(mask_blk.float())
    scores.view(b, hkv, group, n, kend).add_(bias.unsqueeze(2))
    return scores, q_blk, dist, factor


class _BlockwiseRetentionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, log_beta, mask, scaling, block_size, theta, tau, decay):
        b, hq, tq, d = query.shape
        hkv, tk, dv = key.shape[1], key.shape[2], value.shape[-1]
        group = hq // hkv
        offset = tk - tq
        cdt = query.dtype
        qg = query.reshape(b, hkv, group, tq, d)
        key3 = key.reshape(b * hkv, tk, d)
        value3 = value.reshape(b * hkv, tk, dv)
        out = torch.empty(b, hkv, group, tq, dv, dtype=cdt, device=query.device)
        lse = torch.empty(b, hkv, group, tq, dtype=torch.float32, device=query.device)
        ws = _make_workspace(b, hkv, group, tq, tk, block_size, cdt, query.device, False)
        evict = None if theta is None else (theta, tau, decay)
        with torch.autocast(query.device.type, enabled=False):
            for s in range(0, tq, block_size):
                e = min(s + block_size, tq)
                n, kend = e - s, offset + e
                scores, _, _, _ = _block_scores(ws, qg, key3, log_beta, mask, scaling, s, e,
                                                offset, evict)
                m = scores.amax(dim=-1, keepdim=True)
                empty = torch.isneginf(m)  # rows without any admissible key
                m = m.masked_fill(empty, 0.0)
                _exp_(scores.sub_(m))
                if empty.any():
                    scores.masked_fill_(empty, 0.0)
                denom = scores.sum(dim=-1, keepdim=True)
                scores.div_(denom.clamp_min(torch.finfo(torch.float32).tiny))
                probs = _as_compute(scores, cdt, ws, 0)
                o = torch.bmm(probs, value3[:, :kend])
                out[:, :, :, s:e] = o.view(b, hkv, group, n, dv)
                row_lse = (m + torch.log(denom)).view(b, hkv, group, n)
                # rows without any admissible key: +inf makes exp(s - lse) = 0 in backward
                lse[:, :, :, s:e] = torch.where(denom.view(b, hkv, group, n) > 0, row_lse, math.inf)
        ctx.save_for_backward(query, key, value, log_beta, mask, out, lse, theta, tau)
        ctx.scaling = scaling
        ctx.block_size = block_size
        ctx.decay = decay
        return out.view(b, hq, tq, dv)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, log_beta, mask, out, lse, theta, tau = ctx.saved_tensors
        evict = None if theta is None else (theta, tau, ctx.decay)
        scaling, block_size = ctx.scaling, ctx.block_size
        need_q, need_k, need_v, need_lb = ctx.needs_input_grad[:4]
        b, hq, tq, d = query.shape
        hkv, tk, dv = key.shape[1], key.shape[2], value.shape[-1]
        group = hq // hkv
        offset = tk - tq
        cdt = query.dtype
        dev = query.device
        qg = query.reshape(b, hkv, group, tq, d)
        key3 = key.reshape(b * hkv, tk, d)
        value3 = value.reshape(b * hkv, tk, dv)
        dog = grad_out.reshape(b, hkv, group, tq, dv).to(cdt)
        delta = (dog.float() * out.float()).sum(-1)  # (B, Hkv, G, Tq)
        dq = torch.empty_like(qg) if need_q else None
        dk = torch.zeros(b * hkv, tk, d, dtype=torch.float32, device=dev) if need_k else None
        dvv = torch.zeros(b * hkv, tk, dv, dtype=torch.float32, device=dev) if need_v else None
        dlb = torch.zeros(b, hkv, tk, dtype=torch.float32, device=dev) if need_lb else None
        ws = _make_workspace(b, hkv, group, tq, tk, block_size, cdt, dev, True)
        with torch.autocast(dev.type, enabled=False):
            for s in range(0, tq, block_size):
                e = min(s + block_size, tq)
                n, kend = e - s, offset + e
                scores, q_blk, dist, factor = _block_scores(
                    ws, qg, key3, log_beta, mask, scaling, s, e, offset, evict
                )
                probs = scores.view(b, hkv, group, n, kend)
                lse_blk = lse[:, :, :, s:e, None]
                _exp_(probs.sub_(lse_blk))
                if torch.isinf(lse_blk).any():
                    probs.masked_fill_(torch.isinf(lse_blk), 0.0)
                do_blk = dog[:, :, :, s:e].reshape(b * hkv, group * n, dv)
                if need_v:
                    pc = _as_compute(scores, cdt, ws, 0)
                    dvv[:, :kend] += torch.bmm(pc.transpose(1, 2), do_blk).float()
                if not (need_q or need_k or need_lb):
                    continue
                ds = _bmm(do_blk, value3[:, :kend].transpose(1, 2), ws, 1, 3)
                ds5 = ds.view(b, hkv, group, n, kend)
                ds5.sub_(delta[:, :, :, s:e, None]).mul_(probs)  # dL/dscores
                if need_lb:
                    dsum = torch.sum(ds5, dim=2, out=ws.view(ws.f32[1], b, hkv, n, kend))
                    dsum.mul_(dist)
                    if factor is not None:
                        dsum.mul_(factor)
                    dlb[:, :, :kend] += dsum.sum(dim=-2)
                if need_q or need_k:
                    dsc = _as_compute(ds.mul_(scaling), cdt, ws, 0)
                    if need_q:
                        dq[:, :, :, s:e] = torch.bmm(dsc, key3[:, :kend]).view(b, hkv, group, n, d)
                    if need_k:
                        dk[:, :kend] += torch.bmm(dsc.transpose(1, 2), q_blk).float()
        return (
            None if dq is None else dq.view(b, hq, tq, d),
            None if dk is None else dk.view(b, hkv, tk, d).to(key.dtype),
            None if dvv is None else dvv.view(b, hkv, tk, dv).to(value.dtype),
            None if dlb is None else dlb.to(log_beta.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------------------------------
# "sdpa": SDPA over query blocks with a per-block bias, checkpointed per block


def _sdpa_block(q_blk, k_rep, v_rep, log_beta, mask_blk, dist, scaling, group, theta, tau,
                decay=True):
    bias = _bias(dist, log_beta if theta is None or decay else torch.zeros_like(log_beta),
                 mask_blk)
    if theta is not None:
        bias = bias + _evict_term(dist * log_beta[:, :, None, :], theta, tau)
    bias = bias.repeat_interleave(group, dim=1).to(q_blk.dtype)
    return F.scaled_dot_product_attention(q_blk, k_rep, v_rep, attn_mask=bias, scale=scaling)


def _sdpa_blocks(query, key, value, log_beta, mask, scaling, block_size, theta=None, tau=None,
                 decay=True):
    hq, tq = query.shape[1], query.shape[2]
    hkv, tk = key.shape[1], key.shape[2]
    group = hq // hkv
    offset = tk - tq
    k_rep = key.repeat_interleave(group, dim=1)
    v_rep = value.repeat_interleave(group, dim=1)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, log_beta))
    outs = []
    for s in range(0, tq, block_size):
        e = min(s + block_size, tq)
        kend = offset + e
        dist = _distance(offset + s, e - s, kend, query.device)
        mask_blk = None if mask is None else mask[:, :, s:e, :kend]
        args = (
            query[:, :, s:e],
            k_rep[:, :, :kend],
            v_rep[:, :, :kend],
            log_beta[:, :, :kend],
            mask_blk,
            dist,
            scaling,
            group,
            None if theta is None else theta[:, :, s:e],
            None if tau is None else tau[:, :, s:e],
            decay,
        )
        if grad:
            outs.append(checkpoint(_sdpa_block, *args, use_reentrant=False))
        else:
            outs.append(_sdpa_block(*args))
    return torch.cat(outs, dim=2)


# --------------------------------------------------------------------------------------------------
# "flex": compiled FlexAttention (forward only on CPU)

_COMPILED_FLEX = None


def _flex(query, key, value, log_beta, mask, scaling):
    global _COMPILED_FLEX
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, log_beta))
    if grad and query.device.type == "cpu":
        raise KVBoundError(
            "impl='flex' cannot run backward on CPU (torch FlexAttention has no CPU backward); "
            "use impl='blockwise' for training on CPU"
        )
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    b, hq, tq, _ = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    group = hq // hkv
    offset = tk - tq
    lb = log_beta.float()
    add = None
    if mask is not None:
        add = _additive(mask).expand(b, 1, tq, tk)

    def score_mod(score, bi, hi, qi, ki):
        score = score + (qi + offset - ki).to(torch.float32) * lb[bi, hi // group, ki]
        if add is not None:
            score = score + add[bi, 0, qi, ki]
        return score

    def causal(bi, hi, qi, ki):
        return qi + offset >= ki

    block_mask = create_block_mask(causal, None, None, tq, tk, device=query.device)
    cdt = query.dtype
    return _COMPILED_FLEX(
        query,
        key.to(cdt),
        value.to(cdt),
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scaling,
        enable_gqa=group > 1,
    )


# --------------------------------------------------------------------------------------------------
# public entry point


def retention_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_beta: torch.Tensor,
    scaling: float | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    impl: Impl = "blockwise",
    evict_budget: int | None = None,
    evict_tau: float = 0.5,
    evict_scale: str = "relative",
    evict_decay: bool = True,
) -> torch.Tensor:
    """Causal retention-gated attention, memory-efficient for long sequences.

    Parameters
    ----------
    query : Tensor (B, Hq, Tq, d)
    key, value : Tensor (B, Hkv, Tk, d)
        ``Hq`` must be a multiple of ``Hkv``; query head ``h`` uses KV head ``h // (Hq // Hkv)``.
        ``Tq <= Tk``; the queries are the last ``Tq`` positions (query row ``r`` sits at absolute
        position ``Tk - Tq + r``), which is the ordinary ``Tq == Tk`` case in training.
    log_beta : Tensor (B, Hkv, Tk)
        Per-token log retention (``<= 0``, finite). Computed in fp32 whatever its input dtype.
    scaling : float, optional
        Logit scale, ``1/sqrt(d)`` by default.
    attention_mask : Tensor (b, 1, Tq, Tk), optional, b in {1, B}
        Extra mask (e.g. padding): boolean (True = may attend) or additive float. The causal mask
        is always applied on top. It receives no gradient.
    block_size : int
        Query rows per block ("blockwise" and "sdpa").
    impl : {"blockwise", "sdpa", "flex"}
        See the module docstring. "flex" is forward-only on CPU.
    evict_budget, evict_tau, evict_scale : int, float, str
        Eviction-aware training (module docstring): soft-mask the keys outside each query's
        top-``evict_budget`` retention scores, with temperature ``evict_tau``, relative to the
        threshold's magnitude or absolute (``evict_scale``; "blockwise", "sdpa").
    evict_decay : bool
        Keep the paper's soft decay in the logits beside the eviction mask (default), or use the
        mask alone, as the cache attends.

    Returns
    -------
    Tensor (B, Hq, Tq, d)
        In the compute dtype: the autocast dtype when autocast is on, else the promoted dtype of
        query/key/value. Rows with no admissible key are zero ("blockwise").
    """
    _check_inputs(query, key, value, log_beta, attention_mask)
    if block_size < 1:
        raise KVBoundError(f"block_size must be >= 1, got {block_size}")
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    cdt = _compute_dtype(query, key, value)
    q, k, v = query.to(cdt), key.to(cdt), value.to(cdt)
    lb = log_beta.float()
    theta = tau = None
    if evict_budget is not None:
        if evict_budget < 1 or evict_tau <= 0:
            raise KVBoundError(f"evict_budget must be >= 1 and evict_tau > 0, got "
                               f"{evict_budget}, {evict_tau}")
        if impl == "flex":
            raise KVBoundError("eviction-aware training is implemented for impl='blockwise' and "
                               "'sdpa', not 'flex'")
        theta = eviction_threshold(lb, int(evict_budget), q.shape[2], attention_mask, block_size)
        tau = row_temperature(theta, float(evict_tau), evict_scale)
    if impl == "blockwise":
        mask = attention_mask
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.detach()
        return _BlockwiseRetentionAttention.apply(q, k, v, lb, mask, scaling, int(block_size),
                                                  theta, tau, bool(evict_decay))
    if impl == "sdpa":
        return _sdpa_blocks(q, k, v, lb, attention_mask, scaling, int(block_size), theta, tau,
                            bool(evict_decay))
    if impl == "flex":
        return _flex(q, k, v, lb, attention_mask, scaling)
    raise KVBoundError(f"unknown impl {impl!r}; choose 'blockwise', 'sdpa' or 'flex'")


# --------------------------------------------------------------------------------------------------
# transformers integration


def kvbound_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function ``"kvbound_retention"``.

    Reads ``module._kvbound_log_beta`` ((B, H_kv, T_k), set by a forward pre-hook on the attention
    module). When it is missing or ``None`` this is exactly transformers' SDPA attention (teacher
    pass). Otherwise it runs :func:`retention_attention` with the transformers mask (from the
    registered ``sdpa_mask``: ``None`` for plain causal, else a boolean (B, 1, Tq, Tk) keep-mask).
    Returns ``(attn_output (B, Tq, Hq, d), None)`` like every transformers attention function.
    """
    log_beta = log_beta_of(module)
    rank = rank_of(module)
    if rank is not None:  # attention-rank objective: score the gate against this attention
        from kvbound.train.rank_loss import attention_rank_loss

        module.__dict__[RANK_LOSS_ATTR] = attention_rank_loss(
            query.detach(), key.detach(), rank[0], scaling, attention_mask, **rank[1])
    if log_beta is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise KVBoundError(
            "retention-gated attention does not implement attention dropout; set the model's "
            "attention_dropout to 0 (or call model.eval()) while training gates"
        )
    if kwargs.get("softcap") is not None:
        raise KVBoundError("retention-gated attention does not support attention logit softcapping")
    out = retention_attention(
        query,
        key,
        value,
        log_beta,
        scaling,
        attention_mask=attention_mask,
        block_size=getattr(module, "_kvbound_block_size", DEFAULT_BLOCK_SIZE),
        impl=getattr(module, "_kvbound_attention_impl", "blockwise"),
        **evict_of(module),
    )
    return out.transpose(1, 2).contiguous(), None


def register_retention_attention() -> str:
    """Register ``"kvbound_retention"`` with transformers' attention and mask interfaces.

    Idempotent; nothing is registered at import time. Returns the name to pass to
    ``model.set_attn_implementation``. The mask function is transformers' own ``sdpa_mask`` (without
    a registered mask function transformers would pass no mask at all).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, kvbound_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
