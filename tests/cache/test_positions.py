"""Rolling positions: RoPE positions counted inside the cache, keys re-rotated on compaction."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

from kvbound.cache import EvictionCache
from kvbound.cache.positions import rotate_keys
from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGates
from kvbound.hooks import detach
from kvbound.testing import tiny_model
from tests.rng import gen


@pytest.fixture
def model():
    m = tiny_model("llama", max_position_embeddings=64)
    RetentionGates.for_model(m, intermediate_size=8, bias_init=1.0, seed=0).attach(m)
    yield m
    detach(m)


def _layer0_keys_at(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Layer 0's post-RoPE keys (1, H, n, d) of tokens ``ids`` (n,) at ``positions`` (n,)."""
    inner = model.model
    attn = inner.layers[0].self_attn
    hidden = inner.layers[0].input_layernorm(inner.embed_tokens(ids[None]))
    k = attn.k_proj(hidden).view(1, len(ids), -1, attn.head_dim).transpose(1, 2)
    cos, sin = inner.rotary_emb(hidden, positions[None])
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(k, k, cos, sin)[1]


def _feed(model, cache, ids, step: int):
    with torch.no_grad():
        for i in range(0, ids.shape[1], step):
            model(ids[:, i:i + step], cache=cache)


@pytest.mark.parametrize("policy", ["trimkv", "streaming", "h2o", "knorm"])
def test_rolling_keys_equal_fresh_rope_at_their_rank(model, policy):
    ids = torch.randint(3, 100, (1, 120), generator=gen(1))
    cache = EvictionCache(model, policy, budget=16, buffer=4, positions="rolling")
    _feed(model, cache, ids, 3)
    layer = cache.layers[0]
    pos = layer.positions[0, 0]
    assert cache.stats().evictions > 0 and pos.max() == 119
    for h in range(layer.keys.shape[1]):
        tokens = ids[0, layer.positions[0, h]]
        want = _layer0_keys_at(model, tokens, torch.arange(layer.n))[0, h]
        torch.testing.assert_close(layer.keys_[0, h], want, rtol=1e-4, atol=1e-4)


def test_rotation_composes():
    g = gen(2)
    k = torch.randn(2, 3, 5, 16, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    a = torch.randint(-50, 50, (2, 3, 5), generator=g)
    b = torch.randint(-50, 50, (2, 3, 5), generator=g)
    torch.testing.assert_close(rotate_keys(rotate_keys(k, a, inv), b, inv),
                               rotate_keys(k, a + b, inv), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rotate_keys(k, torch.zeros_like(a), inv), k)


def test_auto_is_absolute_inside_the_context(model):
    ids = torch.randint(3, 100, (1, 60), generator=gen(3))
    outs = []
    for positions in ("auto", "absolute"):
        cache = EvictionCache(model, "trimkv", budget=16, buffer=4, positions=positions)
        with torch.no_grad():
            outs.append(model(ids, cache=cache).logits)
            outs.append(model(ids[:, :1], cache=cache).logits)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
    # exactly max_position_embeddings (64) tokens, after evictions: still absolute
    outs = []
    for positions in ("auto", "absolute"):
        cache = EvictionCache(model, "trimkv", budget=16, buffer=4, positions=positions)
        with torch.no_grad():
            model(ids[:, :56], cache=cache)
            outs.append(model(ids[:, 56:60], cache=cache).logits)
            outs.append(model(torch.cat([ids, ids], 1)[:, 60:64], cache=cache).logits)
        assert cache.rolling is None or not cache.rolling.active
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


def test_auto_switches_to_rolling_past_the_context_without_a_warning(model):
    ids = torch.randint(3, 100, (1, 150), generator=gen(4))
    # sinks keep tokens from before the switch, whose keys the switch itself re-rotated
    cache = EvictionCache(model, "trimkv", budget=16, buffer=4, sinks=2, positions="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _feed(model, cache, ids, 5)
    assert cache.rolling.active
    layer = cache.layers[0]
    assert layer.positions[0, 0, :2].tolist() == [0, 1]
    tokens = ids[0, layer.positions[0, 0]]
    want = _layer0_keys_at(model, tokens, torch.arange(layer.n))[0, 0]
    torch.testing.assert_close(layer.keys_[0, 0], want, rtol=1e-4, atol=1e-4)
    absolute = EvictionCache(model, "trimkv", budget=16, buffer=4, positions="absolute")
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        _feed(model, absolute, ids, 5)


@pytest.mark.portability
def test_rolling_left_padded_batch_matches_rows_alone(model):
    rows = [torch.randint(3, 100, (n,), generator=gen(10 + n)) for n in (72, 56)]  # 16 pads: chunk boundaries align
    longest = max(len(r) for r in rows)
    ids = torch.zeros(2, longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):], mask[i, longest - len(r):] = r, 1
    kw = dict(max_new_tokens=20, do_sample=False, prefill_chunk_size=8)
    batch = model.generate(ids, attention_mask=mask, cache=EvictionCache(
        model, "trimkv", budget=16, buffer=4, positions="rolling"), **kw)[:, longest:]
    for i, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long),
                               cache=EvictionCache(model, "trimkv", budget=16, buffer=4,
                                                   positions="rolling"), **kw)[0, len(r):]
        assert batch[i].tolist() == alone.tolist()


def test_rolling_with_a_large_budget_equals_the_full_cache(model):
    ids = torch.randint(3, 100, (1, 40), generator=gen(5))
    with torch.no_grad():
        full = model(ids, cache=DynamicCache(config=model.config)).logits
        rolled = model(ids, cache=EvictionCache(model, "trimkv", budget=64, buffer=4,
                                                positions="rolling")).logits
    torch.testing.assert_close(rolled, full, rtol=1e-5, atol=1e-5)


def test_rolling_refuses_what_it_cannot_do(model):
    with pytest.raises(KVBoundError, match="positions must be one of"):
        EvictionCache(model, "trimkv", budget=16, positions="relative")
    with pytest.raises(KVBoundError, match="one budget for every layer"):
        EvictionCache(model, "pyramidkv", budget=256, positions="rolling")
    with pytest.raises(KVBoundError, match="static=True"):
        EvictionCache(model, "streaming", budget=16, static=True, positions="rolling")
    gemma = tiny_model("gemma3")
    with pytest.raises(KVBoundError, match="sliding-window"):
        EvictionCache(gemma, "streaming", budget=16, positions="rolling")
    assert EvictionCache(gemma, "streaming", budget=16, positions="auto").rolling is None
    # one rotary embedding with one inv_freq is needed: Gemma3's has one per layer type
    from kvbound.cache.positions import rope_inverse_frequencies

    assert torch.equal(rope_inverse_frequencies(model), model.model.rotary_emb.inv_freq)
    with pytest.raises(KVBoundError, match=r"one rotary embedding \(found 0\)"):
        rope_inverse_frequencies(gemma)
