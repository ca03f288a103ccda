"""budget_scope "layer" and "global": heads (and layers) share one budget, stored packed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvbound.cache import EvictionCache
from kvbound.cache.pooled import PooledEvictionLayer
from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGates
from kvbound.testing import TINY_ARCHS, tiny_model
from tests.oracle import expected_keep

SCOPES = ("layer", "global")


def _model(arch="llama", seed=0, **kw):
    model = tiny_model(arch, seed=seed, **kw)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    RetentionGates.for_model(model, bias_init=2.0, init_std=0.5, seed=seed).attach(model)
    return model


def _ids(b=2, t=40, seed=0):
    return torch.randint(3, 100, (b, t), generator=torch.Generator().manual_seed(seed))


def _feed(model, ids, cache, chunk, mask=None, each=None):
    """Logits of ``ids`` fed ``chunk`` tokens at a time; ``each(cache)`` after every forward."""
    out = []
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            kw = {} if mask is None else {"attention_mask": mask[:, : s + chunk]}
            out.append(model(ids[:, s : s + chunk], cache=cache, **kw).logits)
            if each is not None:
                each(cache)
    return torch.cat(out, 1)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("scope", SCOPES)
def test_room_for_everything_is_the_full_cache(arch, scope):
    model = _model(arch)
    ids = _ids()
    full = _feed(model, ids, DynamicCache(config=model.config), 8)
    cache = EvictionCache(model, "trimkv", budget=64, buffer=8, budget_scope=scope)
    torch.testing.assert_close(_feed(model, ids, cache, 8), full, atol=2e-5, rtol=1e-4)
    st = cache.stats()
    assert st.evicted_tokens == 0 and st.evictions == 0
    assert st.kv_footprint == 1.0  # every token seen is held
    assert st.kept_per_head == dict.fromkeys(cache.evicted, [40.0] * model.config.num_key_value_heads)
    gen_full = model.generate(ids, max_new_tokens=12, do_sample=False,
                              cache=DynamicCache(config=model.config))
    gen_pool = model.generate(ids, max_new_tokens=12, do_sample=False,
                              cache=EvictionCache(model, "trimkv", budget=64, buffer=8,
                                                  budget_scope=scope))
    assert torch.equal(gen_full, gen_pool)


@pytest.mark.parametrize("policy", ["tova", "h2o", "snapkv", "pyramidkv"])
@pytest.mark.parametrize("scope", SCOPES)
def test_attention_policies_with_room_for_everything_are_the_full_cache(policy, scope):
    model = _model()
    ids = _ids()
    full = _feed(model, ids, DynamicCache(config=model.config), 8)
    cache = EvictionCache(model, policy, budget=64, buffer=8, budget_scope=scope)
    torch.testing.assert_close(_feed(model, ids, cache, 8), full, atol=2e-5, rtol=1e-4)
    assert cache.stats().evicted_tokens == 0


def _by_slot(layer, values):
    """{(row, position, KV head): value} of a per-head (B, H, n) or pooled (B, 1, n) tensor."""
    pos = layer.positions
    heads = (layer.slot_heads[:, None, :] if isinstance(layer, PooledEvictionLayer) else
             torch.arange(pos.shape[1])[None, :, None].expand_as(pos))
    return {(b, int(pos[b, i, j]), int(heads[b, i, j])): float(values[b, i, j])
            for b in range(pos.shape[0]) for i in range(pos.shape[1]) for j in range(pos.shape[2])
            if pos[b, i, j] >= 0}


@pytest.mark.parametrize("scope", SCOPES)
def test_pooled_attention_scores_are_each_heads_own_distribution(scope):
    """AdaKV's normalisation: in a pooled layer each query head attends only to its own KV
    head's slots, so H2O's accumulated mass of a token equals the per-head cache's (mean over the
    head's query group) divided by the number of KV heads, and TOVA scores a token by its own
    group's last-query attention (per-head TOVA shares one layer-wide score instead)."""
    from kvbound.policies.attention_rows import grouped_probs

    model = _model()
    h = model.config.num_key_value_heads
    ids = _ids(2, 24, seed=9)
    room = dict(budget=64, buffer=8, sinks=0)
    head, pooled = (EvictionCache(model, "h2o", **room),
                    EvictionCache(model, "h2o", budget_scope=scope, **room))
    _feed(model, ids, head, 5)
    _feed(model, ids, pooled, 5)
    for a, b in zip(head.eviction_layers, pooled.eviction_layers, strict=True):
        want = {k: v / h for k, v in _by_slot(a, a.state("h2o")).items()}
        got = _by_slot(b, b.state("h2o"))
        assert got.keys() == want.keys() and len(got) == 2 * 24 * h
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k
    head, pooled = (EvictionCache(model, "tova", **room),
                    EvictionCache(model, "tova", budget_scope=scope, **room))
    _feed(model, ids, head, 5)
    _feed(model, ids, pooled, 5)
    for a, b in zip(head.eviction_layers, pooled.eviction_layers, strict=True):
        q = a.queries
        probs = grouped_probs(a.keys_, q.queries[:, :, -1:], a.positions, q.pos[:, -1:])
        want = {k: v / h for k, v in _by_slot(a, probs[:, :, :, 0].mean(2)).items()}
        got = _by_slot(b, b.policy.score(b))
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k
        per_head = _by_slot(a, a.policy.score(a))  # shared by the heads: differs from pooled
        assert any(abs(per_head[k] - got[k] * h) > 1e-3 for k in got)


@pytest.mark.parametrize("scope", SCOPES)
def test_per_head_view_scores_snapkv_as_the_head_scope_does(scope):
    """SnapKV on a pooled layer reads a per-head view (each head's slots in position order):
    with every head holding the same tokens (no eviction yet), the scores per (row, position,
    head) are the head scope's, so the view's gather and scatter lose nothing; after evictions
    heads hold different tokens and the view still covers every slot exactly once."""
    from kvbound.cache.pooled import PerHeadView

    model = _model()
    ids = _ids(2, 30, seed=11)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    room = dict(budget=64, buffer=8, sinks=0)
    head = EvictionCache(model, "snapkv", **room)
    pooled = EvictionCache(model, "snapkv", budget_scope=scope, **room)
    _feed(model, ids, head, 6, mask=mask)
    _feed(model, ids, pooled, 6, mask=mask)
    for a, b in zip(head.eviction_layers, pooled.eviction_layers, strict=True):
        want = _by_slot(a, a.policy_scores())
        got = _by_slot(b, b.policy_scores())
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
    small = EvictionCache(model, "snapkv", budget=5, buffer=2, sinks=1, budget_scope=scope)
    _feed(model, ids, small, 3, mask=mask)
    for layer in small.eviction_layers:
        view = PerHeadView(layer)
        covered = sorted(view.index[view.present].view(2, -1)[0].tolist())
        assert covered == list(range(layer.n))  # row 0: each slot once
        assert (layer.head_counts() <= view.n).all()
        heads = layer.slot_heads.gather(1, view.index.reshape(2, -1)).reshape(view.index.shape)
        assert (heads[view.present] == torch.arange(view.index.shape[1])[None, :, None]
                .expand_as(heads)[view.present]).all()
        pos = view.positions
        assert (pos[:, :, 1:] >= pos[:, :, :-1]).logical_or(pos[:, :, 1:] < 0).all()


@pytest.mark.parametrize("scope", SCOPES)
def test_head_counts_are_the_real_tokens_of_each_head(scope):
    """With room for everything every head of a row holds each real token once, from position 0
    on: head_counts is the row's length less its padding, for every head."""
    model = _model()
    ids = _ids(2, 21, seed=12)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    cache = EvictionCache(model, "trimkv", budget=64, buffer=8, budget_scope=scope, sinks=0)
    _feed(model, ids, cache, 7, mask=mask)
    h = model.config.num_key_value_heads
    for layer in cache.eviction_layers:
        assert layer.head_counts().tolist() == [[21] * h, [16] * h]


def _real(layer):
    """Per row: sorted (position, head) of the real tokens a pooled layer holds."""
    pos, heads = layer.positions[:, 0], layer.slot_heads
    return [sorted((int(p), int(h)) for p, h in zip(pos[b], heads[b], strict=False) if p >= 0)
            for b in range(pos.shape[0])]


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("policy", ["trimkv", "streaming", "random", "tova", "h2o", "snapkv",
                                    "pyramidkv"])
def test_every_eviction_keeps_the_top_scored_slots_of_the_pool(scope, policy):
    """Independent check of each eviction: the kept (position, head) pairs are the oracle's
    top-k over the layer's (layer scope) or every layer's (global) slots, and the total never
    passes the pool plus one buffer and one chunk per head."""
    model = _model()
    budget, buffer, chunk, sinks = 6, 3, 2, 1
    cache = EvictionCache(model, policy, budget=budget, buffer=buffer, budget_scope=scope,
                          sinks=sinks)
    layers = cache.eviction_layers
    h = model.config.num_key_value_heads
    checked = []

    def expect(group, keep):
        scores = torch.cat([layer.keep_scores() for layer in group], -1)[:, 0]
        pos = torch.cat([layer.positions[:, 0] for layer in group], -1)
        heads = torch.cat([layer.slot_heads + 100 * i for i, layer in enumerate(group)], -1)
        out = []
        for b in range(scores.shape[0]):
            idx = expected_keep(scores[b].tolist(), pos[b].tolist(), sinks, keep)
            out.append(sorted((int(pos[b, i]), int(heads[b, i])) for i in idx if pos[b, i] >= 0))
        return out

    def held(group):
        rows = [[] for _ in range(group[0].positions.shape[0])]
        for i, layer in enumerate(group):
            for b, pairs in enumerate(_real(layer)):
                rows[b] += [(p, hd + 100 * i) for p, hd in pairs]
        return [sorted(r) for r in rows]

    if scope == "global":
        original = cache.evict_global

        def spy(keep):
            want = expect(layers, keep)
            original(keep)
            assert held(layers) == want
            checked.append(keep)
        cache.evict_global = spy
    else:
        for layer in layers:
            original = layer.evict

            def spy(keep, layer=layer, original=original):
                want = expect([layer], keep)
                original(keep)
                assert held([layer]) == want and layer.n == keep
                checked.append(keep)
            layer.evict = spy

    def bound(c):  # (PyramidKV gives each layer its own budget, the same total)
        total = sum(layer.n for layer in layers)
        assert total <= sum((layer.budget + buffer + chunk) * h for layer in layers)
        assert sum(layer.budget for layer in layers) == budget * len(layers)
        if scope == "layer":
            assert all(layer.n <= (layer.budget + buffer + chunk) * h for layer in layers)

    _feed(model, _ids(2, 48, seed=3), cache, chunk, each=bound)
    assert len(checked) >= 4
    stats = cache.stats()
    assert stats.budget_scope == scope and stats.evictions > 0
    assert sum(sum(v) for v in stats.kept_per_head.values()) <= (budget + buffer) * h * len(
        layers)


@pytest.mark.parametrize("scope", SCOPES)
def test_global_budget_never_holds_more_than_the_per_head_total(scope):
    model = _model()
    budget, buffer = 5, 0
    cache = EvictionCache(model, "trimkv", budget=budget, buffer=buffer, budget_scope=scope,
                          sinks=0)
    head = EvictionCache(model, "trimkv", budget=budget, buffer=buffer, sinks=0)
    h, layers = model.config.num_key_value_heads, len(cache.eviction_layers)
    peaks = []

    def check(c):
        peaks.append(sum(int(v.sum()) for v in
                         (layer.head_counts() for layer in c.eviction_layers)))
    ids = _ids(1, 40, seed=4)
    _feed(model, ids, cache, 1, each=check)
    _feed(model, ids, head, 1)
    # buffer 0: after each step's eviction plus the new token, as the per-head cache
    assert max(peaks) <= (budget + 1) * h * layers
    assert cache.stats().kv_bytes <= head.stats().kv_bytes
    counts = [c for v in cache.stats().kept_per_head.values() for c in v]
    assert sum(counts) <= (budget + 1) * h * layers
    if scope == "global":  # the pool moves between layers: not every head holds the same
        assert len(set(counts)) > 1


@pytest.mark.parametrize("policy", ["trimkv", "tova", "h2o", "snapkv"])
@pytest.mark.parametrize("scope", SCOPES)
def test_left_padded_rows_match_rows_alone(scope, policy):
    model = _model()
    pads = (0, 3, 7)
    ids = _ids(3, 32, seed=5)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
    kw = dict(budget=6, buffer=2, budget_scope=scope, sinks=1)
    cache = EvictionCache(model, policy, **kw)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                             cache=cache)[:, ids.shape[1]:]
    for row, pad in enumerate(pads):
        alone = EvictionCache(model, policy, **kw)
        out = model.generate(ids[row : row + 1, pad:], max_new_tokens=10, do_sample=False,
                             cache=alone)[:, ids.shape[1] - pad:]
        assert torch.equal(out[0], batched[row]), row
        for layer, single in zip(cache.eviction_layers, alone.eviction_layers, strict=True):
            assert _real(layer)[row] == _real(single)[0]


def test_min_per_head_keeps_every_head_alive():
    model = _model()
    h = model.config.num_key_value_heads
    for m in (0, 4):
        cache = EvictionCache(model, "streaming", budget=6, buffer=2, budget_scope="layer",
                              sinks=0, min_per_head=m)
        # streaming scores tie across heads: without a minimum the most recent slots (the last
        # head's) win the ties, so some head may hold fewer than its share
        lows: list[int] = []

        def low(c, lows=lows):
            lows.append(min(int(layer.head_counts().min()) for layer in c.eviction_layers))
        _feed(model, _ids(1, 40, seed=6), cache, 4, each=low)
        if m:
            assert min(lows[3:]) >= m
    assert h > 1


@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("scope", SCOPES)
def test_min_per_head_keeps_each_heads_best_tokens(scope, kv_heads):
    """min_per_head = m: every eviction keeps, in every head, the m real tokens its policy scores
    highest (checked against the raw scores before the eviction, position 0 included), whatever
    the other heads' scores; sinks 0, so nothing else protects the first token."""
    model = _model(seed=3, num_key_value_heads=kv_heads)
    m = 3
    cache = EvictionCache(model, "trimkv", budget=4, buffer=2, budget_scope=scope, sinks=0,
                          min_per_head=m)
    checked = []

    def best(layers):
        out = set()
        for i, layer in enumerate(layers):
            raw, pos, heads = layer.policy_scores()[:, 0], layer.positions[:, 0], layer.slot_heads
            for b in range(raw.shape[0]):
                for k in range(layer.kv_heads):
                    mine = [j for j in range(layer.n) if heads[b, j] == k and pos[b, j] >= 0]
                    top = sorted(mine, key=lambda j: (-float(raw[b, j]), -int(pos[b, j])))[:m]
                    out |= {(i, b, int(pos[b, j]), k) for j in top}
        return out

    def held(layers):
        return {(i, b, p, k) for i, layer in enumerate(layers)
                for b, pairs in enumerate(_real(layer)) for p, k in pairs}

    layers = cache.eviction_layers
    if scope == "global":
        original = cache.evict_global

        def spy(keep):
            want = best(layers)
            original(keep)
            assert want <= held(layers)
            checked.append(any(p == 0 for _, _, p, _ in want))
        cache.evict_global = spy
    else:
        for layer in layers:
            def spy(keep, layer=layer, original=layer.evict):
                want = best([layer])
                original(keep)
                assert want <= held([layer])
                checked.append(any(p == 0 for _, _, p, _ in want))
            layer.evict = spy
    _feed(model, _ids(2, 40, seed=13), cache, 2)
    assert len(checked) >= 4 and any(checked)  # position 0 among some head's best


@pytest.mark.parametrize("scope", SCOPES)
def test_peak_tokens_per_head_is_the_fullest_head_ever(scope):
    """stats().peak_tokens_per_head: the most tokens any head of any layer held after a forward
    (no padding here, so slots are tokens), from the first forward on."""
    model = _model()
    cache = EvictionCache(model, "trimkv", budget=5, buffer=3, budget_scope=scope, sinks=0)
    fullest = []

    def record(c):
        fullest.append(max(int(layer.head_counts().max()) for layer in c.eviction_layers))
        assert c.stats().peak_tokens_per_head == max(fullest)

    _feed(model, _ids(2, 7, seed=15), cache, 7, each=record)  # one prompt, before any eviction
    assert fullest == [7]
    _feed(model, _ids(2, 30, seed=16), cache, 3, each=record)


@pytest.mark.parametrize("chunk", [1, 3])
def test_layer_scope_evicts_when_the_pool_and_buffers_are_full(chunk):
    """Layer scope: a layer's slots climb to at most M x H plus H buffers (plus the chunk being
    added), never beyond, and an eviction brings them back to M x H."""
    model = _model()
    budget, buffer = 5, 3
    cache = EvictionCache(model, "trimkv", budget=budget, buffer=buffer, budget_scope="layer",
                          sinks=0)
    h = model.config.num_key_value_heads
    sizes = []
    _feed(model, _ids(1, 60, seed=14), cache, chunk,
          each=lambda c: sizes.append(int(c.eviction_layers[0].head_counts().sum())))
    limit = budget * h + buffer * h
    assert limit - chunk * h < max(sizes) <= limit
    assert min(sizes[len(sizes) // 2:]) == budget * h + chunk * h  # right after an eviction


def test_global_scope_fills_the_pool_and_one_buffer_per_head_before_evicting():
    """Global scope: decoding token by token, the model's slots climb to exactly M x H x L plus
    one buffer per head (b x H x L) before an eviction brings them back to the pool."""
    model = _model()
    budget, buffer = 5, 3
    cache = EvictionCache(model, "trimkv", budget=budget, buffer=buffer, budget_scope="global",
                          sinks=0)
    layers = cache.eviction_layers
    heads = model.config.num_key_value_heads * len(layers)
    totals = []
    _feed(model, _ids(1, 40, seed=14), cache, 1,
          each=lambda c: totals.append(sum(int(layer.head_counts().sum()) for layer in layers)))
    assert max(totals) == (budget + buffer) * heads
    assert min(totals[20:]) == budget * heads + heads  # right after an eviction, plus the new one


def test_storage_holds_only_the_kept_tokens():
    """Packed storage: bytes allocated follow the tokens kept, plus bounded slack."""
    model = _model()
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    budget, buffer, chunk = 8, 4, 4
    for scope in ("head",) + SCOPES:
        cache = EvictionCache(model, "trimkv", budget=budget, buffer=buffer, budget_scope=scope)
        _feed(model, _ids(2, 200, seed=7), cache, chunk)
        per_token = 2 * 2 * d * 4  # K and V, batch 2, fp32
        slots = cache.stats().allocated_kv_bytes // per_token
        bound = 2 * (budget + buffer + chunk) * cfg.num_key_value_heads * len(
            cache.eviction_layers)
        assert slots <= bound, scope
    assert all(isinstance(layer, PooledEvictionLayer) for layer in cache.eviction_layers)


def test_pooled_mask_is_block_diagonal_over_heads_and_causal_over_new_slots():
    """Element by element against the rule: a query head sees a resident slot iff the slot is
    real and belongs to its KV head, and a new slot iff it is its KV head's, real and not later
    than the query (left-padded rows, a few slots already evicted)."""
    model = _model(kv_heads=2)
    ids, mask = _ids(2, 21, seed=12), torch.ones(2, 21, dtype=torch.long)
    ids[1, :5], mask[1, :5] = 0, 0
    cache = EvictionCache(model, "trimkv", budget=4, buffer=2, budget_scope="layer", sinks=0)
    _feed(model, ids[:, :18], cache, 6, mask=mask[:, :18])
    layer = cache.eviction_layers[0]
    h, g = layer.kv_heads, layer.q_heads // layer.kv_heads
    assert layer.evictions > 0 and g > 1
    new_valid = torch.tensor([[True, True, True], [True, False, True]])
    got = layer.attention_mask(new_valid, torch.float32) == 0  # allowed
    n, heads, pos = layer.n, layer.slot_heads, layer.positions[:, 0]
    want = torch.zeros_like(got)
    for b in range(2):
        for hq in range(h * g):
            for i in range(3):
                for j in range(n):
                    want[b, hq, i, j] = bool(heads[b, j] == hq // g and pos[b, j] >= 0)
                for k in range(h):
                    for j in range(3):
                        want[b, hq, i, n + k * 3 + j] = bool(
                            k == hq // g and j <= i and new_valid[b, j])
    assert torch.equal(got, want)


@pytest.mark.parametrize("scope", SCOPES)
def test_decode_shortcuts_change_nothing(scope, monkeypatch):
    """Pooled decode steps stage the gate inputs (one gate call per ``buffer`` steps) and extend
    the previous step's mask instead of rebuilding it: logits, kept slots and log beta equal
    a run that gates every token at once and rebuilds every mask."""
    model = _model()
    ids = _ids(2, 40, seed=11)
    kw = dict(budget=5, buffer=4, budget_scope=scope, sinks=1)
    fast = EvictionCache(model, "trimkv", **kw)
    staged = []
    original_run = type(fast.eviction_layers[0].gates).run

    def spy(self, positions=None):
        staged.append(self.pending)
        return original_run(self, positions)

    monkeypatch.setattr(type(fast.eviction_layers[0].gates), "run", spy)
    built = []
    original_build = PooledEvictionLayer._build_mask
    monkeypatch.setattr(PooledEvictionLayer, "_build_mask",
                        lambda self, *a: built.append(1) or original_build(self, *a))
    got = _feed(model, ids, fast, 1)
    cache_layers = fast.eviction_layers
    assert max(staged) > 1 and len(built) < len(cache_layers) * 40 / 2
    slow = EvictionCache(model, "trimkv", **kw)
    for layer in slow.eviction_layers:
        layer.gates.rows = 1  # every decode token through the gate on its own
    monkeypatch.setattr(PooledEvictionLayer, "attention_mask",
                        lambda self, valid, dtype, all_valid=False: self._build_mask(valid, dtype))
    want = _feed(model, ids, slow, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(cache_layers, slow.eviction_layers, strict=True):
        assert _real(a) == _real(b)
        torch.testing.assert_close(a.log_beta, b.log_beta, atol=1e-5, rtol=1e-5)  # batched gemm
    assert fast.stats().evictions > 0


@pytest.mark.parametrize("scope", ("head",) + SCOPES)
def test_timings_are_the_time_spent(scope):
    """Eviction time is charged within cache bookkeeping, and no timing exceeds the wall time."""
    import time

    model = _model()
    cache = EvictionCache(model, "trimkv", budget=4, buffer=2, budget_scope=scope)
    ids = _ids(2, 30, seed=9)
    t0 = time.perf_counter()
    _feed(model, ids[:, :6], cache, 6)
    _feed(model, ids[:, 6:], cache, 1)  # decode steps: staged gate inputs (head scope)
    wall = time.perf_counter() - t0
    t = cache.timings
    assert cache.stats().evictions > 0
    assert 0 < t["evict"] <= t["cache_bookkeeping"] < wall
    assert 0 < t["scoring_inputs"] < wall


def test_trimkv_cache_takes_the_scope():
    from kvbound.cache import TrimKVCache

    model = _model()
    cache = TrimKVCache(model, budget=6, buffer=2, budget_scope="global", min_per_head=2)
    _feed(model, _ids(1, 30, seed=8), cache, 4)
    assert cache.settings()["budget_scope"] == "global"
    assert cache.settings()["min_per_head"] == 2
    assert cache.policy.lookahead == 1  # the paper's one-step score by default
    assert min(c for v in cache.stats().kept_per_head.values() for c in v) >= 2


def test_scope_errors_say_what_to_do():
    model = _model()
    with pytest.raises(KVBoundError, match="Unknown budget_scope"):
        EvictionCache(model, "trimkv", budget=8, budget_scope="model")
    for policy in ("rkv", "knorm", "keydiff"):
        with pytest.raises(KVBoundError, match="comparable across heads"):
            EvictionCache(model, policy, budget=8, budget_scope="global")
    with pytest.raises(KVBoundError, match="static"):
        EvictionCache(model, "trimkv", budget=8, budget_scope="layer", static=True)
    with pytest.raises(KVBoundError, match="rolling"):
        EvictionCache(model, "trimkv", budget=8, budget_scope="layer", positions="rolling")
    with pytest.raises(KVBoundError, match="cannot exceed"):
        EvictionCache(model, "trimkv", budget=8, budget_scope="layer", min_per_head=9)
    EvictionCache(model, "trimkv", budget=8, budget_scope="layer", min_per_head=8)  # the limit
    with pytest.raises(KVBoundError, match="applies to budget_scope"):
        EvictionCache(model, "trimkv", budget=8, min_per_head=2)
    cache = EvictionCache(model, "trimkv", budget=8, budget_scope="global")
    _feed(model, _ids(1, 20), cache, 10)
    with pytest.raises(KVBoundError, match="cannot be saved"):
        cache.save("/nonexistent/never-written.safetensors")


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(budget=st.integers(2, 9), buffer=st.integers(0, 4), chunk=st.integers(1, 6),
       sinks=st.integers(0, 1), scope=st.sampled_from(SCOPES), length=st.integers(8, 40),
       pad=st.integers(0, 5))
def test_pooled_invariants(budget, buffer, chunk, sinks, scope, length, pad):
    """Bound, exact seen count, sinks kept, padding never counted, per random settings."""
    model = _model()
    h = model.config.num_key_value_heads
    ids = _ids(2, length, seed=length)
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    cache = EvictionCache(model, "trimkv", budget=budget, buffer=buffer, budget_scope=scope,
                          sinks=sinks)
    layers = cache.eviction_layers

    def check(c):
        held = sum(int(layer.head_counts().sum()) // 2 for layer in layers)
        assert sum(layer.n for layer in layers) <= (budget + buffer + chunk) * h * len(layers)
        assert held >= 0
        for layer in layers:
            counts = layer.head_counts()
            seen = layer.row_seen
            assert (counts <= seen[:, None]).all()
            if sinks:  # every head of every row keeps its first token once seen
                for b in range(counts.shape[0]):
                    if seen[b] > 0:
                        first = (layer.positions[b, 0] == 0)
                        assert int(first.sum()) == h
    _feed(model, ids, cache, chunk, mask=mask, each=check)
    assert cache.eviction_layers[0].row_seen.tolist() == [length, length - pad]
