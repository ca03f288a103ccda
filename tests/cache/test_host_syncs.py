"""The decode step never reads a device value on the host (issue 20): on a GPU such a read stalls
the stream every step and breaks CUDA-graph capture. Counted on CPU with the profiler, with the
accelerator code path forced (``defer_host_checks``), over steps that evict."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import masking_utils

import kvbound.cache.layer as layer_module
from kvbound.cache import EvictionCache
from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGates
from kvbound.generation import build_cache
from kvbound.policies import POLICIES
from kvbound.testing import tiny_model
from tests.rng import gen

#: aten ops that copy a device value to the host (``.item()``, ``bool(t)``, data-dependent shapes)
HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero",
              "aten::masked_select", "aten::unique", "aten::_unique2")
STATIC_POLICIES = ("trimkv", "streaming", "knorm", "keydiff", "random")


def host_reads(model, cache, ids, mask, steps: int) -> collections.Counter:
    """Prefill ``ids`` then decode ``steps`` tokens as generate() does (2D mask grown by one);
    the host reads seen by the profiler during the decode steps."""
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache, use_cache=True)
        nxt = ids[:, -1:]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        model(nxt, attention_mask=mask, cache=cache, use_cache=True)  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                model(nxt, attention_mask=mask, cache=cache, use_cache=True)
    return collections.Counter(e.name for e in prof.events() if e.name in HOST_READS)


@pytest.fixture
def deferred(monkeypatch):
    """The accelerator path; and transformers' own SDPA shortcut off (it reads the 2D mask on the
    host for every cache, the full one included; compiled generation skips it too)."""
    monkeypatch.setattr(layer_module, "defer_host_checks", lambda device: True)
    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", lambda *a, **k: False)


def _cache(model, method, static=False):
    kw = {"gates": RetentionGates.for_model(model, seed=0)} if POLICIES[method].needs_gates else {}
    cache, gates, _ = build_cache(model, method, budget=12, buffer=4, sinks=2, static=static,
                                  max_cache_len=64, **kw)
    return cache, gates


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("method", sorted(POLICIES))
def test_dynamic_decode_step_reads_nothing_on_the_host(deferred, method, padded):
    model = tiny_model("llama", seed=0)
    ids = torch.randint(3, 100, (2, 24), generator=gen(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0
    cache, gates = _cache(model, method)
    try:
        reads = host_reads(model, cache, ids, mask, steps=9)  # >= 2 evictions (buffer 4)
        assert cache.stats().evictions >= 2 * len(cache.eviction_layers)
    finally:
        if gates is not None:
            gates.detach(model)
    assert reads == {}, f"{method}: host reads in the decode step: {dict(reads)}"


@pytest.mark.parametrize("method", STATIC_POLICIES)
def test_static_decode_step_reads_nothing_on_the_host(deferred, method):
    model = tiny_model("llama", seed=0)
    ids = torch.randint(3, 100, (2, 24), generator=gen(2))
    cache, gates = _cache(model, method, static=True)
    try:
        reads = host_reads(model, cache, ids, torch.ones_like(ids), steps=9)
        assert cache.stats().evictions >= 2
    finally:
        if gates is not None:
            gates.detach(model)
    assert reads == {}, f"{method}: host reads in the static decode step: {dict(reads)}"


def test_the_cpu_path_reads_the_host_so_the_count_can_fail():
    """Without the accelerator path the NaN check and the mask decision read the host: the
    profiler sees them, so the tests above would catch a read that came back."""
    model = tiny_model("llama", seed=0)
    ids = torch.randint(3, 100, (1, 24), generator=gen(3))
    cache, _ = _cache(model, "streaming")
    assert sum(host_reads(model, cache, ids, torch.ones_like(ids), steps=5).values()) > 0


def test_deferred_nan_check_raises_at_stats(deferred, monkeypatch):
    """On accelerators a NaN score does not stop the step; the next stats() says what happened."""
    model = tiny_model("llama", seed=0)
    cache = EvictionCache(model, "knorm", budget=8, buffer=2)
    monkeypatch.setattr(type(cache.policy), "score",
                        lambda self, layer: torch.full(layer.positions.shape, float("nan")))
    ids = torch.randint(3, 100, (1, 16), generator=gen(4))
    with torch.no_grad():
        for s in range(0, 16, 4):  # evicts, NaN flagged, no raise
            model(ids[:, s:s + 4], cache=cache, use_cache=True)
    with pytest.raises(KVBoundError, match="NaN eviction scores in layer 0 "):
        cache.stats()
    cache.stats()  # the flag was consumed: reported once


def test_cpu_nan_check_raises_in_the_step(monkeypatch):
    model = tiny_model("llama", seed=0)
    cache = EvictionCache(model, "knorm", budget=8, buffer=2)
    monkeypatch.setattr(type(cache.policy), "score",
                        lambda self, layer: torch.full(layer.positions.shape, float("nan")))
    ids = torch.randint(3, 100, (1, 16), generator=gen(5))
    with torch.no_grad(), pytest.raises(KVBoundError, match="NaN eviction scores"):
        for s in range(0, 16, 4):
            model(ids[:, s:s + 4], cache=cache, use_cache=True)


@pytest.mark.parametrize("method", ["trimkv", "h2o", "snapkv", "streaming"])
def test_deferred_path_computes_what_the_host_path_does(monkeypatch, method):
    """The accelerator path (no host reads: masks always built, NaN flagged for later) gives
    the logits of the CPU path on a left-padded batch, prefill and evicting decode steps."""
    model = tiny_model("llama", seed=0)
    ids = torch.randint(3, 100, (2, 24), generator=gen(5))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0

    def run():
        cache, gates = _cache(model, method)
        out, m = [], mask
        try:
            with torch.no_grad():
                out.append(model(ids, attention_mask=m, cache=cache, use_cache=True).logits)
                for i in range(9):
                    m = torch.cat([m, m.new_ones(m.shape[0], 1)], 1)
                    out.append(model(ids[:, i : i + 1], attention_mask=m, cache=cache,
                                     use_cache=True).logits)
            assert cache.stats().evictions > 0
        finally:
            if gates is not None:
                gates.detach(model)
        return torch.cat(out, 1)

    host = run()
    monkeypatch.setattr(layer_module, "defer_host_checks", lambda device: True)
    torch.testing.assert_close(run(), host, rtol=1e-5, atol=1e-5)
