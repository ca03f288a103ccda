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
    assert stored_kv_bytes(cache) >= st.kv_bytes  # the buffers hold at least what is resident


def stored_kv_bytes_resident(layer) -> int:
    return 2 * layer.keys_.numel() * layer.keys_.element_size()


def test_warns_once_past_the_models_positions(model):
    cache = EvictionCache(model, "streaming", budget=8, buffer=4, positions="absolute")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(_ids(40), cache=cache)
            for i in range(20):  # positions 40..59 pass the 48 the model was made for
                model(_ids(1, 10 + i), cache=cache)
    past = [w for w in caught if "max_position_embeddings (48)" in str(w.message)]
    assert len(past) == 1


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
