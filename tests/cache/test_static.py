"""Static-shape decoding (EvictionCache(static=True)) and torch.compile, on tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

from kvbound.cache import EvictionCache
from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGates
from kvbound.testing import tiny_model

pytestmark = pytest.mark.portability


def _model(arch="llama"):
    model = tiny_model(arch, seed=0)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    RetentionGates.for_model(model, bias_init=2.0, init_std=0.5, seed=0).attach(model)
    return model


def _gen(model, ids, cache, **kw):
    kw.setdefault("max_new_tokens", 40)
    return model.generate(ids, do_sample=False, cache=cache, disable_compile=True, **kw)


def _eager_compile_config():
    cfg = CompileConfig(backend="eager", mode=None, fullgraph=False, dynamic=False)
    cfg._compile_all_devices = True  # transformers compiles on accelerators only by default
    return cfg


@pytest.mark.parametrize("policy", ["trimkv", "streaming", "knorm", "keydiff"])
@pytest.mark.parametrize("buffer", [0, 4])
def test_static_equals_dynamic(policy, buffer):
    model = _model()
    # 3 rows against the model's 2 KV heads: a batch axis confused with the head axis shows
    ids = torch.randint(1, 100, (3, 30), generator=torch.Generator().manual_seed(0))
    dyn = EvictionCache(model, policy, budget=8, buffer=buffer)
    sta = EvictionCache(model, policy, budget=8, buffer=buffer, static=True)
    assert sta.is_compileable and not dyn.is_compileable
    a = _gen(model, ids, dyn, prefill_chunk_size=8)
    b = _gen(model, ids, sta, prefill_chunk_size=8)
    assert torch.equal(a, b)
    sa, sb = dyn.stats(), sta.stats()
    assert (sa.seen_tokens, sa.evictions, sa.peak_tokens_per_head) == \
           (sb.seen_tokens, sb.evictions, sb.peak_tokens_per_head)
    for idx in sta.evicted:
        assert torch.equal(sta.resident_positions(idx), dyn.resident_positions(idx))
        assert sta.layers[idx].capacity == 8 + buffer + 1  # fixed while decoding


def test_static_decode_tensors_keep_their_address_and_are_marked_static():
    """CUDA graphs (reduce-overhead) replay reads the cache where it was recorded: through
    evictions the decode tensors stay at one address, marked static for torch.compile."""
    model = _model()
    cache = EvictionCache(model, "trimkv", budget=8, buffer=2, static=True)
    ids = torch.randint(1, 100, (2, 20), generator=torch.Generator().manual_seed(2))
    layer = cache.layers[0]
    addresses = set()
    with torch.no_grad():
        model(ids, cache=cache)
        for i in range(9):  # evicts every 2 steps
            model(ids[:, i:i + 1], cache=cache)
            addresses.add((layer.keys.data_ptr(), layer.values.data_ptr(), layer._pos.data_ptr(),
                           cache._static.mask.data_ptr()))
    assert cache.stats().evictions >= 4 * len(cache.evicted)
    assert len(addresses) == 1
    for t in (layer.keys, layer.values, layer._pos, cache._static.mask, cache._static.slot):
        assert getattr(t, "_dynamo_static_input_type", None) is not None


@pytest.mark.parametrize("chunk", [None, 5])
def test_static_left_padded_batch_matches_dynamic(chunk):
    """Padding read from generate's 4D masks, in one prefill or in chunks (the second chunk
    still holds padding of row 0)."""
    model = _model()
    ids = torch.randint(1, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    ids[0, :7] = 0
    kw = {"attention_mask": mask} if chunk is None else {"attention_mask": mask,
                                                         "prefill_chunk_size": chunk}
    a = _gen(model, ids, EvictionCache(model, "trimkv", budget=10, buffer=3), **kw)
    b = _gen(model, ids, EvictionCache(model, "trimkv", budget=10, buffer=3, static=True), **kw)
    assert torch.equal(a, b)


def test_compiled_static_decoding_matches_eager_without_recompiling():
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = _model()
    ids = torch.randint(1, 100, (1, 20), generator=torch.Generator().manual_seed(2))
    want = _gen(model, ids, EvictionCache(model, "trimkv", budget=8, buffer=4))
    torch._dynamo.reset()
    counters.clear()
    cache = EvictionCache(model, "trimkv", budget=8, buffer=4, static=True)
    got = model.generate(ids, do_sample=False, cache=cache, max_new_tokens=40,
                         compile_config=_eager_compile_config())
    assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] >= 1  # the decode steps did run compiled
    assert not counters["recompiles"], dict(counters["recompiles"])
    assert cache.stats().peak_tokens_per_head <= 8 + 4 + 20
    assert cache.stats().evictions > 0
    # a second generation with a new cache reuses the compiled graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = model.generate(ids, do_sample=False, max_new_tokens=40,
                               cache=EvictionCache(model, "trimkv", budget=8, buffer=4,
                                                   static=True),
                               compile_config=_eager_compile_config())
    assert torch.equal(again, want)
    torch._dynamo.reset()


def test_static_refuses_what_it_cannot_do():
    model = _model()
    for policy in ("h2o", "tova", "snapkv", "rkv"):  # reads queries, keeps state, or both
        with pytest.raises(KVBoundError, match="tracks attention"):
            EvictionCache(model, policy, budget=8, static=True)
    from kvbound.policies.knorm import KNormPolicy

    class Tracking(KNormPolicy):  # keeps per-token state from every forward, reads no query
        def on_update(self, layer, new_queries):
            return None

    with pytest.raises(KVBoundError, match="tracks attention"):
        EvictionCache(model, Tracking(), budget=8, static=True)
    from kvbound.policies.streaming import StreamingPolicy

    class Uneven(StreamingPolicy):
        def layer_budget(self, layer_idx, evicted, budget):
            return budget + layer_idx

    with pytest.raises(KVBoundError, match="one budget"):
        EvictionCache(model, Uneven(), budget=8, static=True)
    with pytest.raises(KVBoundError, match="freeze"):
        EvictionCache(model, "trimkv", budget=8, static=True).freeze()
    EvictionCache(model, "trimkv", budget=8, static=True).freeze(False)  # already evicting: fine
    gemma = _model("gemma3")
    with pytest.raises(KVBoundError, match="sliding-window"):
        EvictionCache(gemma, "trimkv", budget=8, static=True)


def test_manual_compiled_decode_loop_keeps_positions_without_recompiling():
    """A hand-written loop (no position_ids): positions come from get_seq_length()."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = _model()
    ids = torch.randint(1, 100, (1, 16), generator=torch.Generator().manual_seed(5))

    def run(cache, step):
        out, nxt = [], None
        with torch.no_grad():
            logits = model(ids, cache=cache).logits
            nxt = logits[:, -1:].argmax(-1)
            for _ in range(30):
                out.append(nxt)
                nxt = step(nxt, cache=cache).logits[:, -1:].argmax(-1)
                assert int(cache.get_seq_length()) == cache.layers[0].seen
        return torch.cat(out, 1)

    want = run(EvictionCache(model, "trimkv", budget=6, buffer=3), model)
    assert torch.equal(run(EvictionCache(model, "trimkv", budget=6, buffer=3, static=True), model),
                       want)
    torch._dynamo.reset()
    counters.clear()
    compiled = model.get_compiled_call(_eager_compile_config())
    got = run(EvictionCache(model, "trimkv", budget=6, buffer=3, static=True), compiled)
    assert torch.equal(got, want)
    assert not counters["recompiles"], dict(counters["recompiles"])
    torch._dynamo.reset()


@pytest.mark.parametrize("method,sample", [("full", False), ("trimkv", False), ("trimkv", True)])
def test_generate_with_compile_matches_eager(method, sample, monkeypatch):
    """generate(compile=True): static cache (StaticCache for full) + compiled decoding."""
    import torch._dynamo

    from kvbound import generation
    from kvbound.testing import ByteTokenizer

    model = _model()
    ids = torch.randint(1, 100, (1, 20), generator=torch.Generator().manual_seed(6))
    kw = dict(method=method, budget=8, buffer=4, max_new_tokens=24, min_new_tokens=24,
              gates=None, sample=sample, seed=3)
    eager = generation.generate(model, ByteTokenizer(), ids, **kw)
    monkeypatch.setattr(generation, "compile_config", lambda device: _eager_compile_config())
    torch._dynamo.reset()
    comp = generation.generate(model, ByteTokenizer(), ids, compile=True, **kw)
    torch._dynamo.reset()
    assert comp.compiled and not eager.compiled
    assert comp.token_ids == eager.token_ids
    assert comp.seen_tokens == eager.seen_tokens == 20 + 23
    if method == "trimkv":
        assert comp.peak_tokens_per_head == eager.peak_tokens_per_head <= 8 + 4 + 20


def test_static_full_cache_needs_its_length():
    from kvbound.generation import build_cache

    with pytest.raises(KVBoundError, match="max_cache_len"):
        build_cache(_model(), "full", budget=8, buffer=4, static=True)
