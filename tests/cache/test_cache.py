"""EvictionCache invariants on tiny random models: bound, seen counter, top-M, equivalences."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvbound.cache import EvictionCache
from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGates
from kvbound.hooks import detach
from kvbound.testing import TINY_ARCHS, tiny_model
from tests.oracle import EvictionSpy
from tests.rng import gen


def _model(arch="llama", seed=0, bias_init=2.0, **kw):
    model = tiny_model(arch, seed=seed, **kw)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    gates = RetentionGates.for_model(model, bias_init=bias_init, init_std=0.5, seed=seed)
    gates.attach(model)
    return model


def _gen(model, ids, cache=None, new=20, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(ids, max_new_tokens=new, cache=cache, **kw)[:, ids.shape[1]:]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_large_budget_equals_full_cache(arch):
    model = _model(arch)
    ids = torch.randint(1, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    full = _gen(model, ids, DynamicCache(config=model.config), new=24)
    cache = EvictionCache(model, "trimkv", budget=64, buffer=8)
    ours = _gen(model, ids, cache, new=24)
    assert torch.equal(full, ours)
    assert cache.stats().evicted_tokens == 0
    assert cache.get_seq_length() == 24 + 23


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_bounded_generation_every_arch(arch):
    model = _model(arch)
    ids = torch.randint(1, 100, (1, 40), generator=torch.Generator().manual_seed(2))
    cache = EvictionCache(model, "trimkv", budget=8, buffer=4)
    _gen(model, ids, cache, new=60, prefill_chunk_size=8)
    stats = cache.stats()
    assert stats.peak_tokens_per_head <= 8 + 4 + 8
    assert stats.seen_tokens == 40 + 59
    if arch == "gemma3":
        kinds = [type(layer).__name__ for layer in cache.layers]
        assert "DynamicSlidingWindowLayer" in kinds and "EvictionLayer" in kinds
        assert set(stats.resident_tokens) == set(cache.evicted)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=st.integers(2, 12),
    buffer=st.integers(0, 6),
    chunk=st.integers(1, 16),
    prompt=st.integers(1, 30),
    new=st.integers(1, 30),
    batch=st.integers(1, 3),
    sinks=st.integers(0, 1),
    policy=st.sampled_from(["trimkv", "streaming"]),
)
def test_cache_invariants(budget, buffer, chunk, prompt, new, batch, sinks, policy):
    model = _model("llama", bias_init=1.0)
    g = torch.Generator().manual_seed(budget * 100 + prompt)
    ids = torch.randint(1, 100, (batch, prompt), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, batch):  # left padding on later rows
        pad = int(torch.randint(0, prompt, (1,), generator=g))
        ids[b, :pad] = 0
        mask[b, :pad] = 0
    cache = EvictionCache(model, policy, budget=budget, buffer=buffer,
                          sinks=min(sinks, budget - 1) if policy == "trimkv" else None)
    spy = EvictionSpy().install(cache)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         cache=cache, prefill_chunk_size=chunk)
    assert out.shape == (batch, prompt + new)
    stats = cache.stats()
    seen = prompt + new - 1
    assert stats.seen_tokens == seen
    # the largest forward is a prompt chunk (or the whole prompt when it fits in one)
    largest = max(min(chunk, prompt), 1)
    for layer in cache.layers:
        assert layer.peak <= max(budget + buffer + largest, 1)
        assert layer.peak == stats.peak_tokens[layer.layer_idx]
        # every resident row holds its real tokens in increasing position order; padding slots
        # (-1) are the row's leading pads that were never evicted
        pos = layer.positions
        for b in range(batch):
            for h in range(pos.shape[1]):
                row = pos[b, h]
                real = row[row >= 0]
                assert (real[1:] > real[:-1]).all()
                assert (row[: len(row) - len(real)] < 0).all()  # pads come first
                assert real.max() == mask[b].sum() + new - 2  # newest token always resident
        assert layer.row_seen.tolist() == (mask.sum(-1) + new - 1).tolist()
    # evictions happened exactly when the cache overflowed and each was checked by the oracle
    assert spy.checked == stats.evictions
    assert (stats.evictions > 0) == (seen > budget + buffer)


def test_decode_bound_is_budget_plus_buffer():
    model = _model("llama")
    ids = torch.randint(1, 100, (1, 5), generator=gen(112))
    cache = EvictionCache(model, "trimkv", budget=6, buffer=3)
    _gen(model, ids, cache, new=50)
    assert cache.stats().peak_tokens_per_head == 6 + 3
    assert all(layer.n <= 9 for layer in cache.layers)


def test_full_prefill_then_cut_and_memory_freed():
    model = _model("llama")
    ids = torch.randint(1, 100, (1, 200), generator=gen(121))
    cache = EvictionCache(model, "trimkv", budget=8, buffer=2)
    _gen(model, ids, cache, new=5)
    stats = cache.stats()
    assert stats.peak_tokens_per_head == 200  # whole prompt held once, as the official code does
    layer = cache.layers[0]
    assert layer.n <= 10
    assert layer.capacity <= 2 * (8 + 2 + 1)  # storage shrunk back after the cut


def test_layer0_keys_match_full_cache_at_their_positions():
    """Layer-0 keys depend only on (token, position): resident ones must equal the full cache's."""
    model = _model("llama")
    ids = torch.randint(1, 100, (1, 60), generator=gen(134))
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=full)
    cache = EvictionCache(model, "trimkv", budget=10, buffer=3)
    with torch.no_grad():
        for t in range(60):
            model(ids[:, t : t + 1], cache=cache)
    layer = cache.layers[0]
    pos = layer.positions[0]
    full_keys = full.layers[0].keys[0]
    for h in range(pos.shape[0]):
        assert torch.allclose(layer.keys_[0, h], full_keys[h, pos[h]], atol=1e-6)
    assert cache.get_seq_length() == 60


@pytest.mark.portability
def test_left_padded_batch_matches_rows_alone():
    model = _model("qwen3")
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 100, (n,), generator=g) for n in (30, 17, 24)]
    longest = max(len(r) for r in rows)
    for policy in ("trimkv", "streaming"):
        alone = []
        for r in rows:
            cache = EvictionCache(model, policy, budget=10, buffer=3)
            alone.append(_gen(model, r[None], cache, new=25)[0])
        ids = torch.zeros(3, longest, dtype=torch.long)
        mask = torch.zeros(3, longest, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, longest - len(r):] = r
            mask[i, longest - len(r):] = 1
        cache = EvictionCache(model, policy, budget=10, buffer=3)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False,
                             cache=cache)[:, longest:]
        for i in range(3):
            assert torch.equal(out[i], alone[i]), (policy, i)


def test_sampling_is_seeded_and_bounded():
    model = _model("llama")
    ids = torch.randint(1, 100, (2, 12), generator=gen(175))
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        cache = EvictionCache(model, "trimkv", budget=6, buffer=2)
        outs.append(_gen(model, ids, cache, new=40, do_sample=True, temperature=1.0, top_p=0.9))
        assert cache.stats().peak_tokens_per_head <= 6 + 2 + 12
    assert torch.equal(outs[0], outs[1])


def test_long_generation_far_beyond_budget():
    model = _model("llama", num_layers=1)
    ids = torch.randint(1, 100, (1, 8), generator=gen(187))
    cache = EvictionCache(model, "trimkv", budget=64, buffer=16)
    out = _gen(model, ids, cache, new=4096)
    stats = cache.stats()
    assert out.shape[1] == 4096
    assert stats.seen_tokens == 8 + 4095
    assert stats.peak_tokens_per_head == 80
    assert stats.kv_footprint < 0.05
    assert stats.full_kv_bytes > 40 * stats.peak_kv_bytes


def test_ties_keep_most_recent():
    from kvbound.policies.base import Policy

    class Constant(Policy):
        name = "constant"

        def score(self, layer):
            return torch.zeros(layer.positions.shape)

    model = _model("llama")
    ids = torch.randint(1, 100, (1, 30), generator=gen(208))
    cache = EvictionCache(model, Constant(), budget=5, buffer=0, sinks=0)
    with torch.no_grad():
        model(ids, cache=cache)
        model(ids[:, :1], cache=cache)
    assert cache.resident_positions(0)[0, 0].tolist() == [25, 26, 27, 28, 29, 30]


def test_sinks_are_protected():
    model = _model("llama")
    ids = torch.randint(1, 100, (1, 50), generator=gen(218))
    cache = EvictionCache(model, "trimkv", budget=8, buffer=2, sinks=3)
    _gen(model, ids, cache, new=30, prefill_chunk_size=5)
    for idx in cache.evicted:
        assert (cache.resident_positions(idx)[0, :, :3] == torch.arange(3)).all()
    assert cache.stats().sinks == 3


def test_streaming_keeps_sinks_and_window():
    model = _model("llama")
    ids = torch.randint(1, 100, (1, 40), generator=gen(228))
    cache = EvictionCache(model, "streaming", budget=10, buffer=0)
    with torch.no_grad():
        model(ids, cache=cache)
        model(ids[:, :1], cache=cache)
    pos = cache.resident_positions(0)[0]
    assert pos[:, :4].eq(torch.arange(4)).all()
    assert pos[:, 4:10].eq(torch.arange(34, 40)).all()  # 6 most recent before the new token


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"budget": 0}, "budget"),
        ({"budget": 8.5}, "budget"),
        ({"budget": "8"}, "budget"),
        ({"budget": 8, "buffer": -1}, "buffer"),
        ({"budget": 4, "sinks": 4}, "sinks"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = _model("llama")
    with pytest.raises(KVBoundError, match=match):
        EvictionCache(model, "trimkv", **kwargs)


def test_unknown_method_lists_valid_ones():
    model = _model("llama")
    with pytest.raises(KVBoundError, match="streaming"):
        EvictionCache(model, "nope", budget=8)


def test_kvbound_without_gates_says_what_to_do():
    model = tiny_model("llama")
    with pytest.raises(KVBoundError, match="attach"):
        EvictionCache(model, "trimkv", budget=8)
    detach(model)


def test_nan_gate_names_the_layer():
    model = _model("llama")
    from kvbound.hooks import get_state

    with torch.no_grad():
        get_state(model).gates[1].bias.fill_(float("nan"))
    cache = EvictionCache(model, "trimkv", budget=8, buffer=0)
    with pytest.raises(KVBoundError, match="layer 1"):
        model(torch.randint(1, 100, (1, 12), generator=gen(275)), cache=cache)
        model(torch.randint(1, 100, (1, 1), generator=gen(276)), cache=cache)


@pytest.mark.parametrize("budget,buffer", [(64, 4), (8, 4), (8, 0)])
def test_staged_decode_gates_give_the_same_log_beta(budget, buffer):
    """Decode steps stage gate inputs and run the gate batched later: same log beta per token."""
    from kvbound.architectures import attention_modules
    from kvbound.hooks import get_state

    model = _model("llama")
    gates = get_state(model).gates
    ids = torch.randint(1, 100, (1, 35), generator=torch.Generator().manual_seed(3))
    cache = EvictionCache(model, "trimkv", budget=budget, buffer=buffer)
    per_step: dict[int, list] = {i: [] for i in cache.evicted}  # gate run token by token

    def capture(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        per_step[module.layer_idx].append(gates(module.layer_idx, hidden)[0])

    handles = [a.register_forward_pre_hook(capture, with_kwargs=True)
               for a in attention_modules(model)]
    with torch.no_grad():
        model(ids[:, :10], cache=cache)
        for t in range(10, 35):
            model(ids[:, t : t + 1], cache=cache)
    for h in handles:
        h.remove()
    for idx in cache.evicted:
        layer = cache.layers[idx]
        ref = torch.cat(per_step[idx], dim=-1)  # (H, 35)
        want = ref.gather(1, layer.positions[0])
        torch.testing.assert_close(layer.log_beta[0], want, atol=1e-6, rtol=1e-5)
        assert layer.gates.pending == 0  # reading log beta ran the staged tokens
    if budget < 35:
        assert cache.stats().evictions > 0


def test_beam_search_reorders_a_bounded_cache():
    model = _model("llama")
    ids = torch.randint(1, 100, (1, 20), generator=torch.Generator().manual_seed(4))
    cache = EvictionCache(model, "trimkv", budget=8, buffer=4)
    out = _gen(model, ids, cache, new=30, num_beams=3)
    assert out.shape == (1, 30)
    assert cache.stats().peak_tokens_per_head <= 8 + 4 + 20
    # with a budget larger than everything, beam search equals the full cache's
    full = _gen(model, ids, DynamicCache(config=model.config), new=12, num_beams=3)
    big = _gen(model, ids, EvictionCache(model, "trimkv", budget=64, buffer=4), new=12,
               num_beams=3)
    assert torch.equal(full, big)
