"""Training losses: distillation (KL + NTP), soft memory, capacity loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvbound.errors import KVBoundError
from kvbound.train.losses import capacity_loss, distillation_loss, soft_memory
from tests.rng import gen


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: intra-op threads only add barrier waits (large on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _naive_soft_memory(log_beta, valid=None):
    t = log_beta.shape[-1]
    dist = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).to(log_beta.dtype)
    decay = torch.exp(dist.clamp_min(0) * log_beta[:, :, None, :]) * (dist >= 0)
    if valid is not None:
        decay = decay * valid[:, None, None, :].to(log_beta.dtype)
    return decay.sum(-1)


# --------------------------------------------------------------------------------------------------
# soft memory


@pytest.mark.parametrize(("t", "block"), [(37, 8), (16, 16), (5, 64)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_soft_memory_matches_naive(t, block, with_mask):
    g = torch.Generator().manual_seed(t)
    lb = -2.0 * torch.rand(2, 3, t, generator=g, dtype=torch.float64)
    valid = torch.rand(2, t, generator=g) > 0.25 if with_mask else None
    weights = torch.randn(2, 3, t, generator=g, dtype=torch.float64)

    ref_lb = lb.clone().requires_grad_()
    ref = _naive_soft_memory(ref_lb, valid)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), ref_lb)

    x = lb.float().requires_grad_()
    out = soft_memory(x, valid, block_size=block)
    (grad,) = torch.autograd.grad((out * weights.float()).sum(), x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad.float(), atol=1e-4, rtol=1e-4)


def test_soft_memory_closed_forms():
    # beta = 1: every earlier token counts fully, S_t = t (1-based)
    s = soft_memory(torch.zeros(2, 3, 10))
    torch.testing.assert_close(s, torch.arange(1, 11.0).expand(2, 3, 10))
    # constant beta: geometric series S_t = (1 - beta^t) / (1 - beta)
    beta = 0.9
    s = soft_memory(torch.full((1, 1, 50), math.log(beta)), block_size=7)
    t = torch.arange(1, 51.0)
    torch.testing.assert_close(s[0, 0], (1 - beta**t) / (1 - beta))
    # log beta -> very negative: only the diagonal remains
    s = soft_memory(torch.full((1, 2, 30), -1e4))
    torch.testing.assert_close(s, torch.ones(1, 2, 30))


def test_soft_memory_gradient_formula():
    """dS_t / dlog_beta_i = (t - i) * exp((t - i) * log_beta_i)."""
    lb = torch.tensor([[[-0.3, -0.1, -0.7, -0.2]]], requires_grad=True)
    s = soft_memory(lb, block_size=2)
    (grad,) = torch.autograd.grad(s[0, 0, 3], lb)
    expect = torch.tensor([(3 - i) * math.exp((3 - i) * lb[0, 0, i].item()) for i in range(4)])
    torch.testing.assert_close(grad[0, 0], expect)


def test_soft_memory_backward_keeps_linear_memory():
    """At T = 4096 autograd saves O(T) (log beta), not a (T x T) matrix per (B, H)."""
    b, h, t = 1, 3, 4096
    lb = (-0.01 * torch.rand(b, h, t, generator=gen(83))).requires_grad_()
    saved = []

    def pack(x):
        saved.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        s = soft_memory(lb)
        loss = capacity_loss(lb, 512.0)
    assert sum(saved) < 64 * b * h * t * 4  # O(T); one (T x T) per head would be 4096x bigger
    (s.sum() + loss).backward()
    assert torch.isfinite(lb.grad).all() and lb.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# capacity loss


def test_capacity_loss_paper_by_hand():
    t, m = 10, 4.0
    # beta = 1 -> S_t = t; (1/T) sum_t max(0, t - M) / t
    expect = sum(max(0.0, k - m) / k for k in range(1, t + 1)) / t
    loss = capacity_loss(torch.zeros(2, 3, t), m)
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    # below the budget everywhere -> 0
    assert capacity_loss(torch.zeros(1, 1, 4), 4.0).item() == 0.0
    assert capacity_loss(torch.full((1, 1, 64), -5.0), 4.0).item() == 0.0


def test_capacity_loss_paper_mixed_heads_and_grad():
    t, m = 6, 2.0
    lb = torch.zeros(1, 2, t)
    lb[0, 1] = -50.0  # head 1 keeps only the current token: S_t = 1 <= M
    expect_head0 = sum(max(0.0, k - m) / k for k in range(1, t + 1)) / t
    x = lb.clone().requires_grad_()
    loss = capacity_loss(x, m)
    assert loss.item() == pytest.approx(expect_head0 / 2, rel=1e-6)
    loss.backward()
    # raising retention only hurts: gradient w.r.t. log beta is >= 0 (loss grows as beta grows)
    assert (x.grad[0, 0, :-1] > 0).all() and x.grad[0, 1].abs().max() < 1e-6


def test_capacity_loss_official_by_hand():
    t, m = 10, 4.0
    # S_t = p + 1 with p the 0-based position; r = max(0, (p + 1 - M) / max(p - M, 1))
    r = [max(0.0, (p + 1 - m) / max(p - m, 1.0)) for p in range(t)]
    pos = [x for x in r if x > 0]
    loss = capacity_loss(torch.zeros(1, 2, t), m, variant="official")
    assert loss.item() == pytest.approx(sum(pos) / len(pos), rel=1e-6)
    zero = capacity_loss(torch.zeros(1, 2, 3, requires_grad=True), m, variant="official")
    assert zero.item() == 0.0 and zero.requires_grad


def test_capacity_loss_valid_mask_equals_trimmed_row():
    g = torch.Generator().manual_seed(0)
    lb = -0.05 * torch.rand(2, 3, 40, generator=g)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 25:] = False  # right padding of row 1
    for variant in ("paper", "official"):
        both = capacity_loss(lb, 8.0, variant=variant, valid_mask=valid)
        if variant == "paper":
            expect = (capacity_loss(lb[:1], 8.0) + capacity_loss(lb[1:, :, :25], 8.0)) / 2
            assert both.item() == pytest.approx(expect.item(), rel=1e-5)
        else:
            s0 = soft_memory(lb[:1])
            s1 = soft_memory(lb[1:, :, :25])
            p0, p1 = torch.arange(40.0), torch.arange(25.0)
            r = torch.cat(
                [
                    torch.relu((s0 - 8) / (p0 - 8).clamp_min(1)).flatten(),
                    torch.relu((s1 - 8) / (p1 - 8).clamp_min(1)).flatten(),
                ]
            )
            assert both.item() == pytest.approx((r.sum() / (r > 0).sum()).item(), rel=1e-5)


def test_capacity_loss_list_of_layers_is_layer_mean():
    g = torch.Generator().manual_seed(1)
    layers = [-0.02 * torch.rand(1, 3, 30, generator=g) for _ in range(4)]
    per_layer = torch.stack([capacity_loss(x, 5.0) for x in layers]).mean()
    assert capacity_loss(layers, 5.0).item() == pytest.approx(per_layer.item(), rel=1e-6)


def test_capacity_loss_validation():
    with pytest.raises(KVBoundError, match='memory_size must be'):
        capacity_loss(torch.zeros(1, 1, 4), 0.0)
    with pytest.raises(KVBoundError, match='variant must be'):
        capacity_loss(torch.zeros(1, 1, 4), 4.0, variant="other")
    with pytest.raises(KVBoundError, match='log_beta must be'):
        soft_memory(torch.zeros(4, 4))


# --------------------------------------------------------------------------------------------------
# distillation


def _logits(b=2, t=12, v=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, v, generator=g), torch.randn(b, t, v, generator=g)


def test_kl_zero_when_student_equals_teacher():
    s, _ = _logits()
    labels = torch.randint(0, 40, (2, 12), generator=gen(187))
    out = distillation_loss(s.clone().requires_grad_(), s, None, labels)
    assert out["kl"] == pytest.approx(0.0, abs=1e-6)
    assert out["num_targets"] == 24


def test_ntp_equals_cross_entropy_on_shifted_targets_and_kl_matches():
    student, teacher = _logits(seed=3)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(4))
    labels = torch.roll(ids, -1, dims=1)  # labels[:, t] = ids[:, t + 1]
    target = torch.ones(2, 12, dtype=torch.bool)
    target[:, -1] = False  # plain text: every position but the last
    x = student.clone().requires_grad_()
    out = distillation_loss(x, teacher, target, labels, chunk_size=5)
    ce = F.cross_entropy(student[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
    assert out["ntp"] == pytest.approx(ce.item(), rel=1e-5)
    kl = (
        F.kl_div(
            F.log_softmax(student[:, :-1], -1),
            F.log_softmax(teacher[:, :-1], -1),
            log_target=True,
            reduction="none",
        )
        .sum(-1)
        .mean()
    )
    assert out["kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert out["total"].item() == pytest.approx(out["kl"] + out["ntp"], rel=1e-6)

    # gradient equals autograd through the plain formula
    out["total"].backward()
    y = student.clone().requires_grad_()
    ref = (
        F.cross_entropy(y[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
        + F.kl_div(
            F.log_softmax(y[:, :-1], -1),
            F.log_softmax(teacher[:, :-1], -1),
            log_target=True,
            reduction="none",
        )
        .sum(-1)
        .mean()
    )
    ref.backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5)


def test_target_mask_ignore_index_and_mean_mode():
    student, teacher = _logits(seed=5)
    labels = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(6))
    target = torch.zeros(2, 12, dtype=torch.bool)
    target[0, 3:7] = True
    target[1, 8:] = True
    labels[1, 10] = -100  # ignored even though targeted
    sel = target & (labels != -100)
    out = distillation_loss(student, teacher, target, labels)
    assert out["num_targets"] == int(sel.sum()) == 7
    ce = F.cross_entropy(student[sel], labels[sel])
    assert out["ntp"] == pytest.approx(ce.item(), rel=1e-5)
    mean = distillation_loss(student, teacher, target, labels, reduction_mode="mean")
    assert mean["total"].item() == pytest.approx(out["total"].item() / 2, rel=1e-6)
    # positions outside the targets do not matter
    student2 = student.clone()
    student2[~sel] = 100.0 * torch.randn(int((~sel).sum()), 40, generator=gen(250))
    again = distillation_loss(student2, teacher, target, labels)
    assert again["total"].item() == pytest.approx(out["total"].item(), rel=1e-6)


def test_no_targets_and_bf16_inputs():
    student, teacher = _logits(seed=7)
    x = student.clone().requires_grad_()
    none = distillation_loss(x, teacher, torch.zeros(2, 12, dtype=torch.bool), torch.zeros(2, 12))
    assert none["total"].item() == 0.0 and none["num_targets"] == 0
    none["total"].backward()
    assert x.grad.abs().sum() == 0

    labels = torch.randint(0, 40, (2, 12), generator=gen(263))
    ref = distillation_loss(student, teacher, None, labels)
    xb = student.to(torch.bfloat16).requires_grad_()
    low = distillation_loss(xb, teacher.to(torch.bfloat16), None, labels)
    assert low["total"].dtype == torch.float32
    assert low["total"].item() == pytest.approx(ref["total"].item(), rel=2e-2)
    low["total"].backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()


def test_distillation_validation():
    student, teacher = _logits()
    with pytest.raises(KVBoundError, match='student and teacher'):
        distillation_loss(student, teacher[:, :5], None, torch.zeros(2, 12, dtype=torch.long))
    with pytest.raises(KVBoundError, match='reduction_mode must be'):
        distillation_loss(student, teacher, None, torch.zeros(2, 12), reduction_mode="avg")
