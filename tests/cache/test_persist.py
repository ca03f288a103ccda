"""Saved and reloaded caches continue exactly; loading refuses another model or other gates."""

from __future__ import annotations

import pytest
import torch

from kvbound.cache import EvictionCache, TrimKVCache
from kvbound.cache.persist import read_metadata
from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGates
from kvbound.hooks import detach
from kvbound.testing import tiny_model
from tests.rng import gen


def _model(arch="llama", seed=0, gate_seed=0):
    model = tiny_model(arch, seed=seed)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    RetentionGates.for_model(model, bias_init=2.0, init_std=0.5, seed=gate_seed).attach(model)
    return model


def _greedy(model, ids, cache, new, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, do_sample=False, cache=cache,
                          max_new_tokens=new, prefill_chunk_size=8)


@pytest.mark.parametrize(("arch", "policy", "positions"), [
    ("llama", "trimkv", "auto"), ("llama", "h2o", "auto"), ("llama", "snapkv", "auto"),
    ("gemma3", "trimkv", "auto"), ("llama", "trimkv", "rolling")])
def test_reloaded_cache_continues_with_the_uninterrupted_tokens(tmp_path, arch, policy,
                                                                positions):
    """Generate 30 tokens in one go, or 12, save, load into a fresh cache and generate 18 more:
    the same tokens (greedy), and the reloaded cache has the same statistics."""
    model = _model(arch)
    ids = torch.randint(3, 100, (1, 37), generator=gen(7))
    kw = dict(budget=16, buffer=4, sinks=2, positions=positions)
    whole = _greedy(model, ids, EvictionCache(model, policy, **kw), 30)
    cache = EvictionCache(model, policy, **kw)
    first = _greedy(model, ids, cache, 12)
    cache.save(tmp_path / "c.safetensors")
    loaded = EvictionCache.load(tmp_path / "c.safetensors", model)
    # everything but the allocation (a reloaded cache sizes its storage afresh)
    a, b = loaded.stats().to_dict(), cache.stats().to_dict()
    assert a.pop("allocated_kv_bytes") > 0 and b.pop("allocated_kv_bytes") > 0
    assert a == b and loaded.settings() == cache.settings()
    assert cache.stats().evictions > 0
    rest = _greedy(model, first, loaded, 18)
    assert rest.tolist() == whole.tolist()


def test_left_padded_batch_survives_a_reload(tmp_path):
    model = _model()
    ids = torch.randint(3, 100, (2, 30), generator=gen(8))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    kw = dict(budget=12, buffer=4)
    whole = _greedy(model, ids, EvictionCache(model, "tova", **kw), 24, mask)
    cache = EvictionCache(model, "tova", **kw)
    first = _greedy(model, ids, cache, 10, mask)
    cache.save(tmp_path / "c.safetensors")
    loaded = EvictionCache.load(tmp_path / "c.safetensors", model)
    mask2 = torch.cat([mask, torch.ones(2, 10, dtype=mask.dtype)], 1)
    assert _greedy(model, first, loaded, 14, mask2).tolist() == whole.tolist()


def test_continuing_with_only_the_new_tokens(tmp_path):
    """A conversation turn: input ids are only the tokens the cache has not seen (the last reply
    token, never fed, and the new turn), the mask covers everything (transformers' restart from a
    cache); same tokens as feeding the whole history."""
    model = _model()
    turn1 = torch.randint(3, 100, (1, 25), generator=gen(9))
    turn2 = torch.randint(3, 100, (1, 11), generator=gen(10))
    cache = EvictionCache(model, "trimkv", budget=16, buffer=4)
    out1 = _greedy(model, turn1, cache, 6)
    cache.save(tmp_path / "c.safetensors")
    history = torch.cat([out1, turn2], 1)
    want = _greedy(model, history, EvictionCache.load(tmp_path / "c.safetensors", model), 9)
    loaded = EvictionCache.load(tmp_path / "c.safetensors", model)
    unseen = history[:, loaded.get_seq_length():]
    assert unseen.shape[1] == 1 + turn2.shape[1]
    got = model.generate(unseen, attention_mask=torch.ones_like(history), do_sample=False,
                         cache=loaded, max_new_tokens=9, prefill_chunk_size=8)
    assert got[0, -9:].tolist() == want[0, -9:].tolist()
    assert loaded.stats().seen_tokens == history.shape[1] + 8  # the last new token is not fed


def test_load_refuses_another_model_other_gates_and_bad_files(tmp_path):
    model = _model()
    cache = TrimKVCache(model, budget=8, buffer=2)
    with torch.no_grad():
        model(torch.randint(3, 100, (1, 20), generator=gen(11)), cache=cache)
    path = cache.save(tmp_path / "c.safetensors")
    meta = read_metadata(path)
    assert meta["settings"]["policy"]["policy"] == "trimkv" and meta["seen_total"] == 20
    assert meta["extra"] == {}
    with_extra = cache.save(tmp_path / "e.safetensors", extra={"turns": 3, "who": ["a", "b"]})
    assert read_metadata(with_extra)["extra"] == {"turns": 3, "who": ["a", "b"]}
    assert TrimKVCache.load(path, model).stats().seen_tokens == 20
    other = _model(seed=1)
    with pytest.raises(KVBoundError, match="another model") as err:
        EvictionCache.load(path, other)
    assert "'weights'" in str(err.value) and "num_layers" not in str(err.value)  # only the diff
    detach(model)
    with pytest.raises(KVBoundError, match="the model has none attached"):
        EvictionCache.load(path, model)
    RetentionGates.for_model(model, bias_init=2.0, init_std=0.5, seed=5).attach(model)
    with pytest.raises(KVBoundError, match="built with gates"):
        EvictionCache.load(path, model)
    h2o = EvictionCache(model, "h2o", budget=8, buffer=2)
    with torch.no_grad():
        model(torch.randint(3, 100, (1, 20), generator=gen(12)), cache=h2o)
    h2o.save(tmp_path / "h.safetensors")
    with pytest.raises(KVBoundError, match="holds a 'h2o' cache"):
        TrimKVCache.load(tmp_path / "h.safetensors", model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(KVBoundError, match="not a readable saved cache"):
        EvictionCache.load(tmp_path / "junk.safetensors", model)
    with pytest.raises(KVBoundError, match="No saved cache"):
        EvictionCache.load(tmp_path / "missing.safetensors", model)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(KVBoundError, match="not a kvbound cache"):
        EvictionCache.load(tmp_path / "plain.safetensors", model)


def test_saved_file_is_bounded_by_the_budget(tmp_path):
    """The file holds the resident tokens only: feeding 4x more text does not grow it."""
    model = _model()
    sizes = []
    for n in (60, 240):
        cache = EvictionCache(model, "trimkv", budget=16, buffer=4)
        with torch.no_grad():
            for i in range(0, n, 10):
                model(torch.randint(3, 100, (1, 10), generator=gen(i)), cache=cache)
        sizes.append(cache.save(tmp_path / f"{n}.safetensors").stat().st_size)
    assert abs(sizes[1] - sizes[0]) < 0.02 * sizes[0]
