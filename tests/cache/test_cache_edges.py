"""Cache edges the main tests pass by: smallest budget, memory accounting, warnings, capacity."""

from __future__ import annotations

import warnings

import pytest
import torch

from kvbound.cache import EvictionCache
from kvbound.cache.stats import stored_kv_bytes
from kvbound.errors import KVBoundError
from kvbound.testing import tiny_model
from tests.rng import gen


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0, max_position_embeddings=48)


def _ids(n, seed=1):
    return torch.randint(3, 100, (1, n), generator=gen(seed))


def test_budget_one_is_the_smallest(model):
    cache = EvictionCache(model, "streaming", budget=1, buffer=0)
    assert cache.sinks == 0  # sinks stay inside M
    with torch.no_grad():
        model(_ids(6), cache=cache)
        model(_ids(1), cache=cache)
    assert cache.stats().resident_tokens[0] == 2  # M, then this step's token
    with pytest.raises(KVBoundError, match="budget must be >= 1"):
        EvictionCache(model, "streaming", budget=0, buffer=0)


@pytest.mark.parametrize("scope", ["head", "layer"])
def test_a_frozen_cache_grows_like_a_full_cache_until_thawed(model, scope):
    """Frozen, the cache keeps every token (the logits of a full cache), growing its storage
    only when a chunk does not fit; thawed, it evicts back to M."""
    from transformers import DynamicCache

    ids = _ids(22)
    chunks = [(0, 3), (3, 4), (4, 5), (5, 17), (17, 18), (18, 22)]
    cache = EvictionCache(model, "streaming", budget=4, buffer=2, budget_scope=scope)
    cache.freeze()
    full = DynamicCache(config=model.config)
    layer = cache.eviction_layers[0]
    with torch.no_grad():
        for s, e in chunks:
            ptr = layer.keys.data_ptr() if layer.is_initialized else None
            got = model(ids[:, s:e], cache=cache).logits
            want = model(ids[:, s:e], cache=full).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if scope != "head":  # packed heads: storage grows too (sizes checked in test_pooled)
                assert layer.capacity >= layer.n
            elif (s, e) == (5, 17):  # 5 + 12 tokens > 4 + 2 + 3 slots: M + buffer + 12
                assert layer.capacity == 18
            elif (s, e) == (18, 22):  # grown again, to what the chunk needs
                assert layer.capacity == 22
            elif ptr is not None:  # everything else fit where it was, the last slot included
                assert layer.keys.data_ptr() == ptr
        assert cache.stats().resident_tokens[0] == 22  # nothing evicted while frozen
        cache.freeze(False)
        model(_ids(1, 30), cache=cache)
    assert cache.stats().resident_tokens[0] == 4 + 1  # back to M, plus this step's token


def test_reported_kv_bytes_are_the_stored_bytes(model):
    cache = EvictionCache(model, "streaming", budget=8, buffer=4)
    with torch.no_grad():
        model(torch.cat([_ids(20), _ids(20, 2), _ids(20, 3)]), cache=cache)
        for _ in range(3):
            model(_ids(2)[:, :1].expand(3, 1), cache=cache)
    st = cache.stats()
    resident = sum(st.resident_tokens.values())
    assert st.kv_bytes == 2 * resident * 3 * 2 * 16 * 4  # K+V, batch 3, 2 KV heads, dim 16, fp32
    assert st.kv_bytes == sum(stored_kv_bytes_resident(layer) for layer in cache.layers)
    # the peak: each layer's most resident tokens, the first forward's 20 before any eviction
    assert st.peak_kv_bytes == 2 * 20 * len(cache.eviction_layers) * 3 * 2 * 16 * 4
    layer = cache.eviction_layers[0]
    assert torch.equal(layer.valid, layer.positions >= 0) and bool(layer.valid[..., 0].all())
    # what the buffers hold, capacity included: K and V of every slot
    assert stored_kv_bytes(cache) == sum(2 * 3 * 2 * layer.capacity * 16 * 4
                                         for layer in cache.eviction_layers)
    assert st.allocated_kv_bytes == stored_kv_bytes(cache)


def stored_kv_bytes_resident(layer) -> int:
    return 2 * layer.keys_.numel() * layer.keys_.element_size()


def test_warns_once_past_the_models_positions(model):
    cache = EvictionCache(model, "streaming", budget=8, buffer=4, positions="absolute")

    def past(caught):
        return [w for w in caught if "max_position_embeddings (48)" in str(w.message)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(_ids(48), cache=cache)  # positions 0..47: all inside the 48 it was made for
            assert not past(caught)
            for i in range(20):  # positions 48..67
                model(_ids(1, 10 + i), cache=cache)
    assert len(past(caught)) == 1


def test_inner_model_without_the_model_hook_still_bounds_the_cache(model):
    cache = EvictionCache(model, "streaming", budget=8, buffer=2, sinks=1)
    with torch.no_grad():
        model.model(input_ids=_ids(30), past_key_values=cache, use_cache=True)
        for i in range(6):
            model.model(input_ids=_ids(1, 20 + i), past_key_values=cache, use_cache=True)
    assert cache.stats().peak_tokens_per_head <= 30
    assert max(cache.stats().resident_tokens.values()) <= 8 + 2 + 1
    assert cache.get_seq_length() == 36


def test_memory_is_given_back_after_a_long_full_prefill(model):
    """Buffers more than twice what decoding needs are shrunk at the next eviction."""
    cache = EvictionCache(model, "streaming", budget=4, buffer=2, sinks=0)
    layer = cache.eviction_layers[0]
    with torch.no_grad():
        model(_ids(12), cache=cache)  # capacity 4 + 2 + 12 = 18 > 2 x (4 + 2 + 1)
        caps = [layer.capacity]
        for i in range(3):
            model(_ids(1, 30 + i), cache=cache)
            caps.append(layer.capacity)
    assert caps[0] == 18 and caps[-1] == 4 + 2 + 1  # M + buffer + one decode token


def test_beam_reorder_keeps_each_rows_counters(model):
    cache = EvictionCache(model, "streaming", budget=8, buffer=4)
    with torch.no_grad():
        model(torch.cat([_ids(10), _ids(10, 2)]), cache=cache)
        model(_ids(1).expand(2, 1), cache=cache)  # row counters: an increment still pending
    layer = cache.eviction_layers[0]
    cache.reorder_cache(torch.tensor([1, 0]))
    assert layer.row_seen.tolist() == [11, 11]
    cache.reorder_cache(torch.tensor([0, 0]))
    assert layer.row_seen.tolist() == [11, 11] and layer.keys_.shape[0] == 2


def test_documented_defaults():
    from kvbound.gates import RetentionGates

    model = tiny_model("llama", seed=0)
    RetentionGates.for_model(model).attach(model)
    cache = EvictionCache(model)
    assert (cache.budget, cache.buffer, cache.sinks, cache.policy.name) == (256, 32, 4, "trimkv")
    from kvbound import TrimKVCache

    trim = TrimKVCache(model)
    assert (trim.budget, trim.buffer, trim.sinks, trim.static, trim.positions_mode) == \
        (256, 32, 4, False, "auto")


def test_eviction_counters_add_up(model):
    cache = EvictionCache(model, "streaming", budget=8, buffer=4)
    with torch.no_grad():
        model(_ids(20), cache=cache)
        for i in range(9):
            model(_ids(1, 40 + i), cache=cache)
    st = cache.stats()
    layers = len(cache.eviction_layers)
    assert st.evicted_tokens == layers * st.seen_tokens - sum(st.resident_tokens.values())
    # the first decode step evicts to M, then every 4th (the buffer of 4 filled again)
    assert st.evictions == layers * 3
    assert st.peak_tokens_per_head == 20
    # resident tokens after each forward: 20, then 9..12, 9..12, 9; seen: 20..29
    resident = [20, 9, 10, 11, 12, 9, 10, 11, 12, 9]
    assert st.kv_footprint == pytest.approx(sum(resident) / sum(range(20, 30)), rel=1e-12)


@pytest.mark.parametrize("as_bool", [True, False])
def test_padding_read_from_generates_4d_masks(as_bool):
    from kvbound.cache.cache import _incoming_validity

    allowed = torch.tensor([[False, False, True, True], [True, True, True, True]])
    mask4d = allowed[:, None, None, :].expand(2, 1, 4, 4)
    if not as_bool:  # additive float mask: 0 where allowed
        mask4d = torch.where(mask4d, 0.0, torch.finfo(torch.float32).min)
    valid, all_valid = _incoming_validity(mask4d, 2, 3, "cpu")
    assert valid.tolist() == [[False, True, True], [True, True, True]] and not all_valid
    # a chunk of two new tokens, the first of them padding (a 2-token prefill chunk)
    mask4d = mask4d.clone()
    mask4d[0, ..., 2] = mask4d[0, ..., 1]
    valid, all_valid = _incoming_validity(mask4d, 2, 2, "cpu")
    assert valid.tolist() == [[False, True], [True, True]] and not all_valid
    # one new token is a decode step: always a real token, whatever the mask
    valid, all_valid = _incoming_validity(mask4d, 2, 1, "cpu")
    assert valid.all() and all_valid
    valid, all_valid = _incoming_validity(None, 2, 3, "cpu")
    assert valid.all() and all_valid


def test_seq_length_is_an_int_again_after_a_static_step(model):
    cache = EvictionCache(model, "streaming", budget=8, buffer=4, static=True)
    with torch.no_grad():
        model(_ids(12), cache=cache)
        for i in range(3):
            model(_ids(1, 50 + i), cache=cache)
            assert cache.get_seq_length() == 13 + i and isinstance(cache.get_seq_length(), int)


def test_padding_does_not_count_as_positions_past_the_context(model):
    """Rows left-padded to 49 columns hold at most 48 real tokens: no position passes 48."""
    cache = EvictionCache(model, "streaming", budget=8, buffer=4, positions="absolute")
    ids = torch.cat([_ids(49), _ids(49, 2)])
    mask = torch.ones_like(ids)
    mask[0, :1], mask[1, :2] = 0, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(ids, attention_mask=mask, cache=cache)
    assert not [w for w in caught if "max_position_embeddings" in str(w.message)]


@pytest.mark.parametrize("method", ["streaming", "knorm", "tova"])
def test_batch_repeat_then_decode_equals_a_batch_prefilled_whole(model, method):
    """batch_repeat_interleave (contrastive search, the fit benchmark) keeps every row's positions:
    a row prefilled alone and repeated decodes exactly as a batch of copies prefilled together."""
    ids = _ids(20)
    steps = [_ids(1, seed=10 + i).expand(3, 1) for i in range(7)]  # evicts (M 8, buffer 4)

    def run(cache, prompt):
        with torch.no_grad():
            model(prompt, cache=cache)
            if prompt.shape[0] == 1:
                cache.batch_repeat_interleave(3)
            logits = [model(s, cache=cache).logits for s in steps]
        return torch.cat(logits, 1), cache.resident_positions(0)

    rep, rep_pos = run(EvictionCache(model, method, budget=8, buffer=4), ids)
    whole, whole_pos = run(EvictionCache(model, method, budget=8, buffer=4), ids.expand(3, -1))
    torch.testing.assert_close(rep, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(rep_pos, whole_pos) and int(rep_pos.max()) == 20 + 7 - 1
    cache = EvictionCache(model, method, budget=8, buffer=4)
    run(cache, ids)
    cache.batch_select_indices(torch.tensor([0, 2]))
    with torch.no_grad():
        model(_ids(1).expand(2, 1), cache=cache)
    assert int(cache.resident_positions(0).max()) == 20 + 7


def test_gate_staging_runs_the_gate_once_per_full_buffer():
    """Decode tokens' gate inputs wait in a buffer of ``buffer`` rows: the gate runs when log
    beta is read or the buffer is full, and a new batch size or dtype starts a new buffer."""
    from kvbound.cache.gate_staging import GateStaging

    staging = GateStaging(buffer=3)
    calls = []

    class SumGate:  # (B, p, D) -> log beta (B, 1, p): each token's sum
        outputs = ("log_beta",)

        def retention(self, hidden, positions=None):
            calls.append(tuple(hidden.shape))
            return {"log_beta": hidden.float().sum(-1)[:, None]}

    staging.gate = SumGate()
    flushed = []

    def flush():
        out = staging.run()
        flushed.append(None if out is None else out["log_beta"])

    token = lambda b, v, dtype=torch.float32: torch.full((b, 1, 4), float(v), dtype=dtype)  # noqa: E731
    for v in (1, 2):
        staging.stage(token(2, v), flush)
    assert calls == [] and staging.pending == 2
    assert staging.run()["log_beta"].tolist() == [[[4.0, 8.0]]] * 2 and calls == [(2, 2, 4)]
    for v in (1, 2, 3, 4):  # the fourth finds the buffer full: one run of three rows
        staging.stage(token(2, v), flush)
    assert calls[1:] == [(2, 3, 4)] and flushed[-1].tolist() == [[[4.0, 8.0, 12.0]]] * 2
    staging.stage(token(3, 5), flush)  # batch of 3: the pending row is run first, then a new buffer
    assert calls[2:] == [(2, 1, 4)] and staging.inputs.shape == (3, 3, 4)
    staging.stage(token(3, 6, torch.bfloat16), flush)  # new dtype: the same
    assert calls[3:] == [(3, 1, 4)] and staging.inputs.dtype == torch.bfloat16
    assert staging.run()["log_beta"].tolist() == [[[24.0]]] * 3 and staging.run() is None


@pytest.mark.parametrize("scope", ["head", "global"])
def test_compress_now_evicts_to_the_budget_once(model, scope):
    """compress_now (the context protocol's one compression) brings a frozen, grown cache down
    to M per head, and does nothing to a cache already within it."""
    cache = EvictionCache(model, "streaming", budget=6, buffer=4, budget_scope=scope)
    layers = len(cache.eviction_layers)
    assert cache.stats().allocated_kv_bytes == 0  # nothing allocated before the first forward
    cache.freeze()
    with torch.no_grad():
        model(_ids(12), cache=cache)
        model(_ids(8, 2), cache=cache)  # frozen: a full layer evicts nothing
    assert cache.stats().evictions == 0
    assert cache.stats().kept_per_head == dict.fromkeys(cache.evicted, [20.0, 20.0])
    cache.compress_now()
    st = cache.stats()
    assert st.resident_tokens == dict.fromkeys(cache.evicted, 6)
    assert st.evicted_tokens == 14 * layers and st.evictions == layers
    cache.compress_now()  # already at M: nothing to do, no eviction counted
    assert cache.stats().evictions == st.evictions and cache.stats().evicted_tokens == 14 * layers


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_small_chunks_with_room_for_everything_are_the_full_cache(model, chunk):
    """Decode steps may skip the mask (SDPA's own causal path); chunks of 2+ tokens may not."""
    from transformers import DynamicCache

    ids = _ids(20, seed=5)
    cache = EvictionCache(model, "streaming", budget=32, buffer=4)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        for s in range(0, 20, chunk):
            got = model(ids[:, s : s + chunk], cache=cache).logits
            want = model(ids[:, s : s + chunk], cache=full).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
