"""Retention-gated attention: blockwise implementations against the naive reference, and the
transformers registration end to end on a tiny Llama."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kvbound.errors import KVBoundError
from kvbound.train.attention import (
    ATTENTION_NAME,
    eviction_threshold,
    naive_retention_attention,
    register_retention_attention,
    retention_attention,
)
from tests.rng import gen

IMPLS = ["blockwise", "sdpa"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: intra-op threads only add barrier waits (large on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(b, hq, hkv, tq, tk, d, seed=0, scale_lb=0.3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, tk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, tk, d, generator=g, dtype=dtype)
    lb = -scale_lb * torch.rand(b, hkv, tk, generator=g, dtype=dtype)
    return q, k, v, lb


def _grads(fn, tensors, go):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * go).sum(), leaves)
    return out.detach(), grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize(("t", "block"), [(37, 8), (16, 16), (5, 8), (33, 32)])
def test_blockwise_matches_naive_values_and_grads(impl, group, t, block):
    hkv = 2
    q, k, v, lb = _inputs(2, hkv * group, hkv, t, t, 16, seed=t + group)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    ref, ref_g = _grads(
        lambda *x: naive_retention_attention(*x), [z.double() for z in (q, k, v, lb)], go.double()
    )
    out, g = _grads(
        lambda *x: retention_attention(*x, block_size=block, impl=impl), [q, k, v, lb], go
    )
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    for name, a, r in zip("q k v log_beta".split(), g, ref_g, strict=False):
        scale = r.abs().max().item()
        torch.testing.assert_close(
            a, r.float(), atol=1e-5 * max(1.0, scale), rtol=1e-4, msg=f"grad {name}"
        )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group", [1, 2, 3])
def test_zero_log_beta_is_causal_sdpa(impl, group):
    q, k, v, lb = _inputs(2, 2 * group, 2, 29, 29, 8, seed=3)
    lb = torch.zeros_like(lb)
    out = retention_attention(q, k, v, lb, block_size=8, impl=impl)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_negative_log_beta_changes_output_and_decays_old_keys():
    q, k, v, lb = _inputs(1, 2, 1, 40, 40, 8, seed=4)
    base = retention_attention(q, k, v, torch.zeros_like(lb))
    strong = retention_attention(q, k, v, torch.full_like(lb, -50.0))
    assert (base - strong).abs().max() > 1e-2
    # with a huge decay each query only sees itself: output = its own value vector
    torch.testing.assert_close(strong, v.repeat_interleave(2, dim=1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_query_suffix_against_longer_keys(impl):
    """Tq < Tk: queries are the last Tq positions."""
    q, k, v, lb = _inputs(1, 4, 2, 7, 19, 8, seed=5)
    go = torch.randn(q.shape, generator=gen(92))
    ref, ref_g = _grads(lambda *x: naive_retention_attention(*x), [q, k, v, lb], go)
    out, g = _grads(lambda *x: retention_attention(*x, block_size=3, impl=impl), [q, k, v, lb], go)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, r in zip(g, ref_g, strict=False):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)
    # same as the last rows of the full square problem
    qf, _, _, _ = _inputs(1, 4, 2, 19, 19, 8, seed=6)
    qf[:, :, -7:] = q
    full = retention_attention(qf, k, v, lb)
    torch.testing.assert_close(full[:, :, -7:], out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_masks_bool_and_additive(impl):
    b, t = 2, 21
    q, k, v, lb = _inputs(b, 4, 2, t, t, 8, seed=7)
    keep = torch.ones(b, t, dtype=torch.bool)
    keep[1, :5] = False  # left padding in row 1
    bool_mask = keep[:, None, None, :].expand(b, 1, t, t)
    add_mask = torch.zeros(b, 1, t, t).masked_fill(~bool_mask, float("-inf"))
    go = torch.randn(q.shape, generator=gen(113))
    ref, ref_g = _grads(
        lambda *x: naive_retention_attention(*x, attention_mask=bool_mask), [q, k, v, lb], go
    )
    for mask in (bool_mask, add_mask):
        out, g = _grads(
            lambda *x, m=mask: retention_attention(*x, attention_mask=m, block_size=4, impl=impl),
            [q, k, v, lb],
            go,
        )
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for a, r in zip(g, ref_g, strict=False):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4)
    # padded query rows have no admissible key: zero output, zero gradient
    assert out[1, :, :5].abs().max() == 0
    # valid rows equal the unpadded problem on the row's suffix
    sub = retention_attention(q[1:, :, 5:], k[1:, :, 5:], v[1:, :, 5:], lb[1:, :, 5:])
    torch.testing.assert_close(ref[1:, :, 5:], sub, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_close_to_fp32():
    q, k, v, lb = _inputs(1, 6, 2, 64, 64, 16, seed=8)
    ref = naive_retention_attention(q, k, v, lb)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, lb)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = retention_attention(*leaves, block_size=16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert leaves[3].grad.dtype == torch.float32
    for x in leaves:
        assert x.grad is not None and torch.isfinite(x.grad).all()


def _saved_bytes(t):
    q, k, v, lb = (x.requires_grad_() for x in _inputs(1, 4, 2, t, t, 16, seed=9))
    saved = []

    def pack(x):
        saved.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        retention_attention(q, k, v, lb, block_size=128)
    return sum(saved), sum(x.numel() * x.element_size() for x in (q, k, v, lb))


def test_saved_memory_is_linear_in_t():
    """The blockwise function saves O(T) tensors for backward, never (T x T) scores."""
    small, _ = _saved_bytes(256)
    big, inputs = _saved_bytes(1024)
    assert big <= 3 * inputs  # q, k, v, log_beta, output, log-sum-exp
    assert big / small < 4.5  # 4x longer -> ~4x more, not 16x
    assert big < 4 * 1024 * 1024 * 4 / 8  # far below one (Hq, T, T) fp32 score tensor


def test_input_validation():
    q, k, v, lb = _inputs(1, 4, 2, 8, 8, 8)
    with pytest.raises(KVBoundError, match='log_beta must have'):
        retention_attention(q, k, v, lb[:, :1])
    with pytest.raises(KVBoundError, match=r'query heads \(3\)'):
        retention_attention(q[:, :3], k, v, lb)
    with pytest.raises(KVBoundError, match='attention_mask must be'):
        retention_attention(q, k, v, lb, attention_mask=torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(KVBoundError, match="unknown impl 'nope';"):
        retention_attention(q, k, v, lb, impl="nope")


def test_flex_refuses_cpu_backward():
    q, k, v, lb = (x.requires_grad_() for x in _inputs(1, 4, 2, 8, 8, 8))
    with pytest.raises(KVBoundError, match="blockwise"):
        retention_attention(q, k, v, lb, impl="flex")


@pytest.mark.skipif(
    not os.environ.get("KVBOUND_SLOW_TESTS"),
    reason="compiles FlexAttention (~20 s); set KVBOUND_SLOW_TESTS=1",
)
def test_flex_forward_matches_naive():
    q, k, v, lb = _inputs(1, 6, 2, 128, 128, 16, seed=10)
    with torch.no_grad():
        out = retention_attention(q, k, v, lb, impl="flex")
    torch.testing.assert_close(out, naive_retention_attention(q, k, v, lb), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# transformers integration


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=128,
        head_dim=16,
    )
    return LlamaForCausalLM(config).eval()


def _gate_hooks(model, w):
    """Forward pre-hooks that set a deterministic log beta from each layer's input hidden state."""

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        module._kvbound_log_beta = -0.5 * F.softplus(hidden @ w[module.layer_idx]).transpose(1, 2)

    return [
        layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
        for layer in model.model.layers
    ]


def _manual_forward(model, ids, w):
    """Llama forward written out by hand with the naive retention attention."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    cos, sin = inner.rotary_emb(h, pos)
    b, t, _ = h.shape
    for layer in inner.layers:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        d = attn.head_dim
        q = attn.q_proj(x).view(b, t, -1, d).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, -1, d).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, -1, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        lb = -0.5 * F.softplus(x @ w[attn.layer_idx]).transpose(1, 2)
        o = naive_retention_attention(q, k, v, lb, attn.scaling)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h))


def test_registration_is_explicit_and_idempotent():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    assert register_retention_attention() == ATTENTION_NAME
    assert register_retention_attention() == ATTENTION_NAME
    assert ATTENTION_NAME in AttentionInterface._global_mapping
    assert AttentionMaskInterface._global_mapping[ATTENTION_NAME] is sdpa_mask


def test_tiny_llama_end_to_end():
    register_retention_attention()
    ids = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(0))
    ref_model = _tiny_llama()
    ref_model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits

    model = _tiny_llama()
    model.set_attn_implementation(ATTENTION_NAME)
    for layer in model.model.layers:
        layer.self_attn._kvbound_log_beta = None
    with torch.no_grad():
        teacher = model(input_ids=ids).logits
    torch.testing.assert_close(teacher, ref, atol=1e-5, rtol=1e-5)  # teacher pass = sdpa

    w = 0.5 * torch.randn(2, 64, 2, generator=torch.Generator().manual_seed(1))
    hooks = _gate_hooks(model, w)
    try:
        student = model(input_ids=ids).logits
        assert (student - ref).abs().max() > 1e-3
        with torch.no_grad():
            manual = _manual_forward(model, ids, w)
        torch.testing.assert_close(student.detach(), manual, atol=1e-5, rtol=1e-5)
        # gradients reach the gate weights through the attention
        wg = w.clone().requires_grad_()
        for hk in hooks:
            hk.remove()
        hooks = _gate_hooks(model, wg)
        model(input_ids=ids).logits.logsumexp(-1).sum().backward()
        assert wg.grad is not None and wg.grad.abs().sum() > 0

        # left padding: valid positions reproduce the unpadded row (the mask reaches the function)
        pad = 4
        ids_p = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids[:1]], dim=1)
        att = torch.ones_like(ids_p)
        att[:, :pad] = 0
        with torch.no_grad():
            padded = model(input_ids=ids_p, attention_mask=att).logits
            alone = model(input_ids=ids[:1]).logits
        torch.testing.assert_close(padded[:, pad:], alone, atol=1e-4, rtol=1e-4)
    finally:
        for hk in hooks:
            hk.remove()


def test_dropout_is_refused():
    from kvbound.train.attention import kvbound_attention_forward

    q, k, v, lb = _inputs(1, 4, 2, 8, 8, 8)
    module = torch.nn.Module()
    module._kvbound_log_beta = lb
    with pytest.raises(KVBoundError, match="dropout"):
        kvbound_attention_forward(module, q, k, v, None, dropout=0.1)
    out, weights = kvbound_attention_forward(module, q, k, v, None)
    assert weights is None and out.shape == (1, 8, 4, 8)


def test_eviction_threshold_is_the_mth_score_among_past_keys():
    _, _, _, lb = _inputs(2, 2, 2, 23, 23, 4, seed=3)
    budget = 5
    theta = eviction_threshold(lb, budget, tq=23, block_size=4)
    for t in range(23):
        scores = (t - torch.arange(t + 1)).float() * lb[..., : t + 1]
        want = (scores.topk(budget, dim=-1).values[..., -1] if t + 1 > budget
                else torch.full(scores.shape[:2], float("-inf")))
        torch.testing.assert_close(theta[..., t], want)
    # queries that are a suffix of the keys sit at the end
    torch.testing.assert_close(eviction_threshold(lb, budget, tq=7), theta[..., -7:])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("group", "t", "block", "budget"), [(1, 37, 8, 6), (3, 33, 32, 4),
                                                              (2, 16, 16, 40)])
@pytest.mark.parametrize(("scale", "decay"), [("relative", True), ("absolute", True),
                                              ("relative", False)])
def test_eviction_aware_matches_naive_values_and_grads(impl, group, t, block, budget, scale,
                                                       decay):
    """The eviction term in the fused kernel: same output and gradients as autograd through the
    reference; and it does change the output (keys past the top-M are masked). Without the decay
    term (``evict_decay=False``) and nothing to evict, it is plain causal attention."""
    hkv = 2
    q, k, v, lb = _inputs(2, hkv * group, hkv, t, t, 16, seed=t + group, scale_lb=1.0)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    kw = {"evict_budget": budget, "evict_tau": 0.3, "evict_scale": scale, "evict_decay": decay}
    ref, ref_g = _grads(lambda *x: naive_retention_attention(*x, **kw),
                        [z.double() for z in (q, k, v, lb)], go.double())
    out, g = _grads(lambda *x: retention_attention(*x, block_size=block, impl=impl, **kw),
                    [q, k, v, lb], go)
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    for name, a, r in zip("q k v log_beta".split(), g, ref_g, strict=False):
        scale = r.abs().max().item()
        torch.testing.assert_close(a, r.float(), atol=1e-5 * max(1.0, scale), rtol=1e-4,
                                   msg=f"grad {name}")
    plain = retention_attention(q, k, v, lb if decay else torch.zeros_like(lb),
                                block_size=block, impl=impl)
    if budget >= t:  # nothing to evict
        torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)
    else:
        assert (out - plain).abs().max() > 1e-3


def test_eviction_aware_guards_a_needed_key_at_the_eviction_boundary():
    """A key the loss needs, whose score sits at the top-M boundary, gets a stronger push to be
    retained longer than the soft decay alone gives (the barrier that keeps attention sinks);
    a key far below the boundary is evicted (next to no attention), as in the cache."""
    t, budget = 24, 4
    q, k, v, _ = _inputs(1, 1, 1, t, t, 8, seed=5)
    k[..., 0, :] = 3 * q[..., -1, :] / q[..., -1, :].norm()  # the last query wants key 0
    target = v[..., 0, :].clone()

    def grad_of_key0(lb0, **kw):
        lb = torch.full((1, 1, t), -0.2)
        lb[..., 0] = lb0
        x = lb.requires_grad_()
        out = retention_attention(q, k, v, x, **kw)
        loss = ((out[..., -1, :] - target) ** 2).sum()
        (g,) = torch.autograd.grad(loss, x)
        return g[..., 0].item(), loss.item()

    at_boundary = -0.6 / (t - 1)  # key 0's score = the 4th best score (distances 0..3 at -0.2)
    evict, _ = grad_of_key0(at_boundary, evict_budget=budget, evict_tau=0.25,
                            evict_scale="absolute")
    plain, _ = grad_of_key0(at_boundary)
    assert evict < 0 and plain < 0  # descent raises log beta_0 in both
    assert abs(evict) > 1.5 * abs(plain)
    _, far_loss = grad_of_key0(-0.2, evict_budget=budget, evict_tau=0.25, evict_scale="absolute")
    _, kept_loss = grad_of_key0(-0.2)
    assert far_loss > kept_loss  # evicted: the output lost what key 0 gave


def test_relative_temperature_cannot_be_escaped_by_shrinking_every_score():
    """With an absolute temperature, scaling every log beta by c < 1 softens the eviction mask
    (the loophole a gate used in training); relative to |theta| the mask is unchanged."""
    from kvbound.train.attention import _evict_term, row_temperature

    _, _, _, lb = _inputs(1, 2, 2, 30, 30, 4, seed=9, scale_lb=1.0)
    score = (torch.arange(30.0)[:, None] - torch.arange(30.0)[None, :]) * lb[:, :, None, :]
    score = score.masked_fill(score > 0, float("-inf"))  # keys after the query
    theta = eviction_threshold(lb, 6, 30)
    rows = slice(6, None)  # queries with something to evict

    def term(c, scale):
        th = theta * c
        return _evict_term(score * c, th, row_temperature(th, 0.1, scale))[..., rows, :]

    torch.testing.assert_close(term(0.01, "relative"), term(1.0, "relative"))
    assert (term(0.01, "absolute") - term(1.0, "absolute")).nan_to_num().abs().max() > 1.0
    with pytest.raises(KVBoundError, match="evict_scale"):
        row_temperature(theta, 0.1, "nope")


def test_eviction_aware_validation():
    q, k, v, lb = _inputs(1, 1, 1, 4, 4, 4)
    with pytest.raises(KVBoundError, match="evict_budget"):
        retention_attention(q, k, v, lb, evict_budget=0)
    with pytest.raises(KVBoundError, match="flex"):
        retention_attention(q, k, v, lb, evict_budget=2, impl="flex")
