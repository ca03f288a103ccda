"""Training losses for TRIM-KV gates (METHOD.md section 4).

* :func:`distillation_loss` -- forward KL(teacher || student) at temperature 1 plus the student's
  next-token cross entropy, both averaged over target positions; summed (paper) or averaged
  (official code).
* :func:`soft_memory` -- S_t = sum_{i<=t} beta_i^(t-i), blockwise with a custom backward so that
  autograd keeps O(T) memory.
* :func:`capacity_loss` -- the hinge that pushes S_t below the memory size M (paper or official
  normalisation).

Everything is computed in fp32 whatever the input dtype (bf16 logits under autocast are upcast
chunk by chunk).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from kvbound.errors import KVBoundError

__all__ = ["capacity_loss", "distillation_loss", "soft_memory"]

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 23  # fp32 elements per (positions x vocab) chunk (32 MB)


# --------------------------------------------------------------------------------------------------
# distillation: forward KL + next-token prediction


class _ChunkedKLCE(torch.autograd.Function):
    """Sums over the selected rows of KL(softmax(teacher) || softmax(student)) and of the student's
    cross entropy; recomputes the softmaxes chunk by chunk in backward (nothing vocab-sized saved).
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, rows, chunk):
        kl = torch.zeros((), dtype=torch.float32, device=student.device)
        ce = torch.zeros((), dtype=torch.float32, device=student.device)
        lowest = torch.finfo(torch.float32).min
        for c in range(0, rows.numel(), chunk):
            r = rows[c : c + chunk]
            ls = torch.log_softmax(student[r], dim=-1, dtype=torch.float32)
            lt = torch.log_softmax(teacher[r], dim=-1, dtype=torch.float32)
            ce -= ls.gather(-1, labels[r, None]).sum()
            pt = lt.exp()
            # KL = sum p_t (log p_t - log p_s); clamping keeps 0 * log 0 terms at 0, not NaN
            lt.clamp_(min=lowest).sub_(ls)
            kl += torch.dot(pt.view(-1), lt.view(-1))
        ctx.save_for_backward(student, teacher, labels, rows)
        ctx.chunk = chunk
        return kl, ce

    @staticmethod
    def backward(ctx, g_kl, g_ce):
        student, teacher, labels, rows = ctx.saved_tensors
        grad = torch.zeros_like(student)
        for c in range(0, rows.numel(), ctx.chunk):
            r = rows[c : c + ctx.chunk]
            ps = torch.softmax(student[r], dim=-1, dtype=torch.float32)
            pt = torch.softmax(teacher[r], dim=-1, dtype=torch.float32)
            # d KL / d s = softmax(s) - p_t ;  d CE / d s = softmax(s) - onehot(label)
            g = ps.mul_(g_kl + g_ce).sub_(pt.mul_(g_kl))
            g.scatter_add_(-1, labels[r, None], (-g_ce).expand(r.numel(), 1).contiguous())
            grad.index_copy_(0, r, g.to(grad.dtype))
        return grad, None, None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    reduction_mode: Literal["sum", "mean"] = "sum",
    chunk_size: int | None = None,
) -> dict:
    """Quality loss: forward KL(teacher || student) + student next-token cross entropy.

    Alignment (the shift is the caller's, and explicit): ``logits[b, t]`` is the distribution over
    the token that follows position ``t``, so ``labels[b, t]`` must be that next token, i.e.
    ``labels[:, t] = input_ids[:, t + 1]`` (for example ``torch.roll(input_ids, -1, dims=1)`` with
    ``target_mask[:, -1] = False``). ``target_mask[b, t]`` says that position ``t`` is scored on
    predicting ``labels[b, t]`` (response tokens for chat data; every position but the last of each
    row for plain text). Positions whose label is ``-100`` are skipped as well.

    Parameters
    ----------
    student_logits : Tensor (B, T, V)
        With grad; any float dtype (upcast to fp32 chunk by chunk).
    teacher_logits : Tensor (B, T, V)
        Treated as a constant (detached).
    target_mask : Tensor (B, T) bool, or None (= every position whose label is not -100)
    labels : Tensor (B, T) long, already shifted (see above)
    reduction_mode : {"sum", "mean"}
        ``"sum"``: KL + NTP (paper, default); ``"mean"``: (KL + NTP) / 2 (official code).
    chunk_size : int, optional
        Positions per fp32 chunk; default keeps each (chunk x V) fp32 block at 32 MB.

    Returns
    -------
    dict
        ``"total"``: scalar tensor with grad; ``"kl"``, ``"ntp"``: detached floats (means over the
        targets); ``"num_targets"``: int. With no target at all every part is 0 (``"total"`` stays
        connected to the graph).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 3:
        raise KVBoundError(
            "student and teacher logits must both be (B, T, V); got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    b, t, v = student_logits.shape
    if tuple(labels.shape) != (b, t):
        raise KVBoundError(f"labels must be (B, T) = {(b, t)}, got {tuple(labels.shape)}")
    if reduction_mode not in ("sum", "mean"):
        raise KVBoundError(f"reduction_mode must be 'sum' or 'mean', got {reduction_mode!r}")
    select = labels != IGNORE_INDEX
    if target_mask is not None:
        if tuple(target_mask.shape) != (b, t):
            raise KVBoundError(
                f"target_mask must be (B, T) = {(b, t)}, got {tuple(target_mask.shape)}"
            )
        select = select & target_mask.bool()
    rows = select.reshape(-1).nonzero().squeeze(1)
    n = rows.numel()
    if n == 0:
        zero = student_logits.sum() * 0.0
        return {"total": zero.float(), "kl": 0.0, "ntp": 0.0, "num_targets": 0}
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // v)
    kl_sum, ce_sum = _ChunkedKLCE.apply(
        student_logits.reshape(b * t, v),
        teacher_logits.detach().reshape(b * t, v),
        labels.reshape(b * t).long().clamp_min(0),
        rows,
        int(chunk),
    )
    kl, ntp = kl_sum / n, ce_sum / n
    total = kl + ntp if reduction_mode == "sum" else (kl + ntp) / 2
    return {
        "total": total,
        "kl": float(kl.detach()),
        "ntp": float(ntp.detach()),
        "num_targets": int(n),
    }


# --------------------------------------------------------------------------------------------------
# soft memory and capacity loss


def _decay_block(lb, weights, s, e, out):
    """exp((t - i) * log_beta_i) for rows t in [s, e) and keys i < e, written into ``out``.

    Returns the block (B, H, n, e) (zero above the diagonal and at invalid keys) and t - i (n, e).
    Exponents below -87 are clamped (their exp is < 1.7e-38, i.e. zero at fp32 precision) because
    torch's vectorised exp takes a much slower path for very negative inputs.
    """
    b, h, _ = lb.shape
    n = e - s
    t = torch.arange(s, e, device=lb.device, dtype=torch.float32)
    i = torch.arange(e, device=lb.device, dtype=torch.float32)
    dist = t[:, None] - i[None, :]
    blk = out[: b * h * n * e].view(b, h, n, e)
    torch.mul(dist, lb[:, :, None, :e], out=blk)
    blk.clamp_(min=-87.0).exp_()
    above = torch.ones(n, n, dtype=torch.bool, device=lb.device).triu_(1)
    blk[..., e - n :].masked_fill_(above, 0.0)
    if weights is not None:
        blk.mul_(weights[:, None, None, :e])
    return blk, dist


class _SoftMemory(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_beta, weights, block_size):
        b, h, t = log_beta.shape
        out = torch.empty(b, h, t, dtype=torch.float32, device=log_beta.device)
        work = torch.empty(b * h * min(block_size, t) * t, dtype=torch.float32, device=out.device)
        for s in range(0, t, block_size):
            e = min(s + block_size, t)
            blk, _ = _decay_block(log_beta, weights, s, e, work)
            out[:, :, s:e] = blk.sum(-1)
        ctx.save_for_backward(log_beta, weights)
        ctx.block_size = block_size
        return out

    @staticmethod
    def backward(ctx, grad):
        log_beta, weights = ctx.saved_tensors
        b, h, t = log_beta.shape
        block_size = ctx.block_size
        grad = grad.float()
        dlb = torch.zeros_like(log_beta)
        work = torch.empty(b * h * min(block_size, t) * t, dtype=torch.float32, device=dlb.device)
        for s in range(0, t, block_size):
            e = min(s + block_size, t)
            blk, dist = _decay_block(log_beta, weights, s, e, work)
            # dS_t / dlog_beta_i = (t - i) * exp((t - i) * log_beta_i)
            blk.mul_(dist)
            dlb[:, :, :e] += (grad[:, :, None, s:e] @ blk).squeeze(-2)
        return dlb, None, None


def soft_memory(
    log_beta: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
    *,
    block_size: int = 256,
) -> torch.Tensor:
    """Soft memory S_t = sum_{i<=t} exp((t - i) * log_beta_i), per (B, H, t), in fp32.

    Blockwise over t with a custom backward that recomputes each block: autograd saves only
    ``log_beta`` (O(T)); the transient work buffer is (B, H, block_size, T) fp32. O(T^2) compute.

    Parameters
    ----------
    log_beta : Tensor (B, H, T), values <= 0
    valid_mask : Tensor (B, T) bool, optional
        Tokens that exist (False = padding); padding tokens contribute nothing to any S_t.
        Positions t are still indexed by their place in the row.
    block_size : int
        Rows t per block.
    """
    if log_beta.dim() != 3:
        raise KVBoundError(f"log_beta must be (B, H, T), got {tuple(log_beta.shape)}")
    if block_size < 1:
        raise KVBoundError(f"block_size must be >= 1, got {block_size}")
    b, _, t = log_beta.shape
    weights = None
    if valid_mask is not None:
        if tuple(valid_mask.shape) != (b, t):
            raise KVBoundError(
                f"valid_mask must be (B, T) = {(b, t)}, got {tuple(valid_mask.shape)}"
            )
        weights = valid_mask.to(device=log_beta.device, dtype=torch.float32)
    return _SoftMemory.apply(log_beta.float(), weights, int(block_size))


def capacity_loss(
    log_beta: torch.Tensor | Sequence[torch.Tensor],
    memory_size: float,
    *,
    variant: Literal["paper", "official"] = "paper",
    valid_mask: torch.Tensor | None = None,
    block_size: int = 256,
) -> torch.Tensor:
    """Capacity loss pushing the soft memory S_t below ``memory_size`` (M).

    ``variant="paper"``: (1/T) sum_t (1/t) max(0, S_t - M) with t 1-based, averaged over batch rows
    and heads. With ``valid_mask``, t counts the valid tokens up to and including position t and
    the average runs over the row's valid positions only.

    ``variant="official"`` (later official code): r_t = max(0, (S_t - M) / max(p_t - M, 1)) with
    p_t the 0-based position (number of valid tokens before t), averaged over the entries where
    r_t > 0 (over every batch row, head and valid position); 0 when there is none.

    Layers: pass one (B, H_kv, T) tensor per call and average the per-layer results yourself, or
    pass a list of per-layer tensors (same B and T). The list is concatenated along the head axis:
    for the paper variant that is exactly the mean over layers and heads; for the official variant
    the positive entries of all layers are pooled, as the official code does per batch.

    Returns a scalar fp32 tensor with grad to ``log_beta``.
    """
    if variant not in ("paper", "official"):
        raise KVBoundError(f"variant must be 'paper' or 'official', got {variant!r}")
    if not isinstance(memory_size, (int, float)) or not math.isfinite(memory_size):
        raise KVBoundError(f"memory_size must be a finite number, got {memory_size!r}")
    if memory_size <= 0:
        raise KVBoundError(f"memory_size must be > 0, got {memory_size}")
    if not isinstance(log_beta, torch.Tensor):
        if len(log_beta) == 0:
            raise KVBoundError("capacity_loss needs at least one log_beta tensor")
        log_beta = torch.cat([x.float() for x in log_beta], dim=1)
    s_t = soft_memory(log_beta, valid_mask, block_size=block_size)  # (B, H, T)
    b, _, t = s_t.shape
    if valid_mask is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=s_t.device)
    else:
        valid = valid_mask.to(device=s_t.device, dtype=torch.bool)
    count = valid.float().cumsum(-1)  # 1-based index among valid tokens
    excess = s_t - float(memory_size)
    if variant == "paper":
        per_pos = torch.relu(excess) / count.clamp_min(1.0)[:, None, :]
        per_pos = per_pos * valid[:, None, :]
        n_valid = valid.sum(-1).clamp_min(1).float()  # (B,)
        return (per_pos.sum(-1) / n_valid[:, None]).mean()
    pos = count - 1.0  # 0-based position id
    denom = (pos - float(memory_size)).clamp_min(1.0)[:, None, :]
    r = torch.relu(excess / denom) * valid[:, None, :]
    active = r > 0
    n_active = active.sum()
    return r.sum() / n_active.clamp_min(1).float()
