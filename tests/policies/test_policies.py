"""Every eviction policy in the same cache: a shared matrix plus one hand-made case per policy.

Matrix: policy x {batch 1, batch 3 left-padded} x {full prefill, chunked prefill} x {greedy,
sampling}. Each cell checks the memory bound, that every eviction keeps exactly the policy's
top-scored tokens (and compacts keys and per-token state with them), and that a budget larger
than the sequence reproduces the uncompressed ``DynamicCache`` token for token.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from kvbound.cache import EvictionCache, EvictionLayer
from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGates
from kvbound.policies import METHODS, POLICIES, get_policy
from kvbound.policies.h2o import H2OPolicy
from kvbound.policies.keydiff import KeyDiffPolicy
from kvbound.policies.knorm import KNormPolicy
from kvbound.policies.pyramidkv import PyramidKVPolicy
from kvbound.policies.rkv import RKVPolicy
from kvbound.policies.snapkv import SnapKVPolicy
from kvbound.policies.streaming import StreamingPolicy
from kvbound.policies.tova import TOVAPolicy
from kvbound.testing import tiny_model
from tests.oracle import EvictionSpy
from tests.rng import gen

NAMES = ["trimkv", "streaming", "h2o", "tova", "snapkv", "pyramidkv", "knorm", "keydiff", "rkv",
         "random"]
BUDGET, BUFFER, CHUNK, PROMPT, NEW = 10, 3, 8, 30, 20
# windows must fit well inside the tiny budget so that attention scores decide something
KWARGS = {"snapkv": {"window": 4}, "pyramidkv": {"window": 4}, "rkv": {"window": 4}}
PADS = (0, 7, 20)  # left padding of the rows of the batch-3 case


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; on a loaded 2-core machine two OpenMP threads
    spin against each other and this file slows down ~20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registry():
    assert list(POLICIES) == NAMES
    assert METHODS == ("full", *NAMES)
    for name in NAMES:
        policy = get_policy(name)
        assert policy.name == name
        assert policy.describe()["policy"] == name
        assert POLICIES[name].__doc__


@pytest.fixture(scope="module")
def model():
    model = tiny_model("llama", seed=0)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    RetentionGates.for_model(model, bias_init=2.0, init_std=0.5, seed=0).attach(model)
    return model


def _inputs(batch: int, pads=PADS):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (batch, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads[:batch]):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def _generate(model, cache, batch, chunk, sample):
    ids, mask = _inputs(batch)
    kw = {"do_sample": sample}
    if sample:
        kw.update(temperature=1.0, top_k=0, top_p=1.0)
        torch.manual_seed(11)
    if chunk:
        kw["prefill_chunk_size"] = chunk
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, cache=cache, **kw)
    return out[:, PROMPT:]


_REFERENCE: dict = {}


def _reference(model, batch, chunk, sample):
    key = (batch, chunk, sample)
    if key not in _REFERENCE:
        _REFERENCE[key] = _generate(model, DynamicCache(config=model.config), batch, chunk, sample)
    return _REFERENCE[key]


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sample"])
@pytest.mark.parametrize("chunk", [None, CHUNK], ids=["full", "chunked"])
@pytest.mark.parametrize("batch", [1, 3], ids=["b1", "b3pad"])
@pytest.mark.parametrize("name", NAMES)
def test_policy_matrix(model, name, batch, chunk, sample):
    kwargs = KWARGS.get(name, {})
    cache = EvictionCache(model, name, budget=BUDGET, buffer=BUFFER, **kwargs)
    spy = EvictionSpy().install(cache)
    out = _generate(model, cache, batch, chunk, sample)
    assert out.shape == (batch, NEW)
    step = chunk or PROMPT
    for layer in cache.layers:
        assert layer.peak <= layer.budget + BUFFER + step, (layer.layer_idx, layer.peak)
        assert layer.n <= layer.budget + BUFFER
    stats = cache.stats()
    assert stats.seen_tokens == PROMPT + NEW - 1
    assert stats.evicted_tokens > 0 and spy.checked > 0

    # a budget above the sequence length (in every layer, PyramidKV's smallest included)
    # must give exactly the uncompressed cache's tokens
    big = EvictionCache(model, name, budget=2048, buffer=BUFFER, **kwargs)
    assert min(layer.budget for layer in big.layers) >= PROMPT + NEW
    assert torch.equal(_generate(model, big, batch, chunk, sample),
                       _reference(model, batch, chunk, sample))
    assert big.stats().evicted_tokens == 0


@pytest.mark.portability
@pytest.mark.parametrize("name", ["h2o", "tova", "snapkv", "pyramidkv", "rkv", "knorm",
                                  "keydiff"])
def test_left_padded_rows_match_rows_alone(model, name):
    """Padding never leaks into scores: each padded row evicts as if it ran alone.

    Every row is longer than budget + buffer in every layer (PyramidKV: 16 + 3), so rows alone
    evict at the same steps as the batch.
    """
    pads = (0, 5, 9)
    ids, mask = _inputs(3, pads)
    kwargs = KWARGS.get(name, {})
    cache = EvictionCache(model, name, budget=BUDGET, buffer=BUFFER, **kwargs)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             cache=cache)[:, PROMPT:]
    for row, pad in enumerate(pads):
        alone = EvictionCache(model, name, budget=BUDGET, buffer=BUFFER, **kwargs)
        out = model.generate(ids[row : row + 1, pad:], max_new_tokens=NEW, do_sample=False,
                             cache=alone)[:, PROMPT - pad:]
        assert torch.equal(out[0], batched[row]), (name, row)
        for layer, single in zip(cache.layers, alone.layers, strict=False):
            real = layer.positions[row][layer.positions[row] >= 0]
            assert real.tolist() == single.positions[0].flatten().tolist()


def test_recent_query_positions_follow_chunks_and_padding(model):
    ids, mask = _inputs(3)  # rows with 0, 7 and 20 padding tokens
    cache = EvictionCache(model, "snapkv", budget=64, buffer=0, window=4)
    layer = cache.layers[0]
    with torch.no_grad():
        model(ids[:, :8], attention_mask=mask[:, :8], cache=cache)
        assert layer.queries.pos.tolist() == [[4, 5, 6, 7], [-1, -1, -1, 0], [-1] * 4]
        assert layer.queries.valid.tolist() == [[True] * 4, [False] * 3 + [True],
                                                     [False] * 4]
        from kvbound.policies.attention_rows import recent_probs

        # the query at position 0 is a real one: it counts
        assert recent_probs(layer)[1].tolist() == layer.queries.valid.tolist()
        model(ids[:, 8:], attention_mask=mask, cache=cache)
    assert layer.queries.pos.tolist() == [list(range(n - 4, n)) for n in (30, 23, 10)]
    assert layer.queries.queries.shape[2] == 4 and layer.queries.valid.all()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_recomputed_attention_rows_equal_the_models(arch):
    """Rows from the buffered queries = the eager attention weights the model itself used."""
    from kvbound.policies.attention_rows import recent_probs

    model = tiny_model(arch, seed=1)
    model.set_attn_implementation("eager")
    ids, mask = _inputs(3)
    cache = EvictionCache(model, "snapkv", budget=64, buffer=0, window=5)
    with torch.no_grad():
        model(ids[:, :12], attention_mask=mask[:, :12], cache=cache)
        out = model(ids[:, 12:], attention_mask=mask, cache=cache, output_attentions=True)
    for idx, layer in enumerate(cache.layers):
        probs, valid = recent_probs(layer)  # (B, H_kv, g, 5, n)
        b, h_kv, g, w, n = probs.shape
        ours = probs.reshape(b, h_kv * g, w, n)
        theirs = out.attentions[idx][:, :, -w:, :n].float()
        assert valid.all()
        assert torch.allclose(ours, theirs, atol=1e-5), (arch, idx)


# ------------------------------------------------------------------------------------------
# hand-made cases with known answers, directly on an EvictionLayer
# ------------------------------------------------------------------------------------------


def _layer(policy, budget=64, buffer=0, sinks=0):
    return EvictionLayer(0, budget, buffer, policy, sinks)


def _feed(layer, keys, queries=None, values=None):
    """Append (B, H_kv, q, d) keys (and queries (B, H_q, q, d)) as one forward would."""
    b, _, q, _ = keys.shape
    seen = layer.row_seen if layer.row_seen is not None else torch.zeros(b, dtype=torch.long)
    pos = seen[:, None] + torch.arange(q)
    layer.prepare(torch.ones(b, q, dtype=torch.bool), pos, torch.full((b,), q), True, None,
                  None, queries)
    layer.update(keys, keys.clone() if values is None else values)


def _kept(layer):
    return layer.positions[0].tolist()


def test_streaming_keeps_exactly_sinks_and_window():
    layer = _layer(StreamingPolicy(), sinks=4)
    _feed(layer, torch.randn(1, 2, 20, 8, generator=gen(213)))
    layer.evict(10)
    assert _kept(layer) == [[0, 1, 2, 3, 14, 15, 16, 17, 18, 19]] * 2


def test_knorm_drops_largest_norm_key():
    keys = torch.nn.functional.normalize(torch.randn(1, 2, 12, 8, generator=gen(219)), dim=-1)
    keys[0, 0, 5] *= 10
    keys[0, 1, 2] *= 10
    layer = _layer(KNormPolicy())
    _feed(layer, keys)
    layer.evict(11)
    assert 5 not in _kept(layer)[0] and len(_kept(layer)[0]) == 11
    assert 2 not in _kept(layer)[1] and 5 in _kept(layer)[1]


def _naive_probs(q, k):
    """Causal softmax(q k^T / sqrt(d)) for one head; q (T, d), k (T, d)."""
    t, d = q.shape
    logits = q @ k.T / math.sqrt(d)
    logits = logits.masked_fill(torch.ones(t, t).triu(1).bool(), -math.inf)
    return logits.softmax(-1)


def test_h2o_accumulates_attention_and_keeps_the_heavy_hitter():
    g = torch.Generator().manual_seed(0)
    t, d = 12, 8
    keys = 0.1 * torch.randn(1, 1, t, d, generator=g)
    queries = 0.1 * torch.randn(1, 2, t, d, generator=g)
    keys[0, 0, 3, 0] = 4.0  # token 3 is the heavy hitter: every later query looks at it
    queries[0, :, 3:, 0] = 4.0
    # accumulated in one prefill chunk, block-wise (block 5 < 12 rows)
    layer = _layer(H2OPolicy(block=5), budget=4)
    _feed(layer, keys, queries)
    expect = torch.stack([_naive_probs(queries[0, h], keys[0, 0]).sum(0) for h in range(2)])
    expect = expect.mean(0)  # mean over the GQA group
    assert torch.allclose(layer.state("h2o")[0, 0], expect, atol=1e-5)
    # the same total when the tokens arrive one per step
    steps = _layer(H2OPolicy(), budget=64)
    for i in range(t):
        _feed(steps, keys[:, :, i : i + 1], queries[:, :, i : i + 1])
    assert torch.allclose(steps.state("h2o"), layer.state("h2o"), atol=1e-5)
    # budget 4: the 2 most recent (10, 11) + the 2 heaviest older tokens (3 and token 0,
    # which every query sees)
    heavy = expect[:10].topk(2).indices.sort().values.tolist()
    assert 3 in heavy
    layer.evict(4)
    assert _kept(layer) == [sorted(heavy + [10, 11])]


def test_tova_keeps_last_querys_top_attended_in_every_head():
    g = torch.Generator().manual_seed(1)
    t, d = 10, 8
    keys = 0.1 * torch.randn(1, 2, t, d, generator=g)
    queries = 0.1 * torch.randn(1, 4, t, d, generator=g)
    keys[0, 0, 2, 1] = 5.0  # KV head 0's group looks at token 2, head 1's at token 5
    keys[0, 1, 5, 1] = 5.0
    queries[0, :, -1, 1] = 5.0
    layer = _layer(TOVAPolicy())
    _feed(layer, keys, queries)
    rows = torch.stack([_naive_probs(queries[0, h], keys[0, h // 2])[-1] for h in range(4)])
    expect = rows.mean(0).topk(3).indices.sort().values.tolist()
    assert {2, 5} <= set(expect)
    layer.evict(3)
    assert _kept(layer) == [expect, expect]


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_keeps_window_and_pooled_top(pooling):
    t, d = 16, 8
    keys = torch.zeros(1, 1, t, d)
    queries = torch.zeros(1, 1, t, d)
    keys[0, 0, 7, 0] = 6.0  # a prefix token the window attends to
    keys[0, 0, 13, 0] = 6.0  # a window token attended just as much: must not leak by pooling
    queries[0, 0, 13:, 0] = 6.0
    layer = _layer(SnapKVPolicy(window=3, kernel=3, pooling=pooling))
    _feed(layer, keys, queries)
    scores = layer.policy.score(layer)[0, 0]
    assert torch.isinf(scores[13:]).all() and torch.isfinite(scores[:13]).all()
    layer.evict(6)
    assert _kept(layer) == [[6, 7, 8, 13, 14, 15]]


def test_mean_over_queries_counts_only_valid_queries():
    from kvbound.policies.attention_rows import mean_over_queries

    rows = torch.arange(24.0).view(2, 1, 3, 4)  # (B, H, w, n)
    valid = torch.tensor([[True, True, True], [False, True, True]])
    got = mean_over_queries(rows * valid[:, None, :, None], valid)
    assert torch.equal(got[0, 0], rows[0, 0].mean(0))
    assert torch.equal(got[1, 0], rows[1, 0, 1:].mean(0))
    none = mean_over_queries(torch.zeros(1, 2, 0, 5), torch.zeros(1, 0, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(1, 2, 5))


def test_pooling_spreads_a_peak_by_half_the_kernel():
    from kvbound.policies.attention_rows import pool1d

    x = torch.tensor([[0.0, 0.0, 3.0, 0.0, 0.0, 0.0]])
    assert pool1d(x, 3, "max").tolist() == [[0.0, 3.0, 3.0, 3.0, 0.0, 0.0]]
    assert pool1d(x, 3, "avg").tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0, 0.0]]
    assert pool1d(x, 5, "max").tolist() == [[3.0, 3.0, 3.0, 3.0, 3.0, 0.0]]
    assert pool1d(x, 2, "max").tolist() == [[0.0, 0.0, 3.0, 3.0, 0.0, 0.0]]  # even: shifted left
    assert torch.equal(pool1d(x, 1, "max"), x)


def test_pyramidkv_budgets_fall_with_depth_and_keep_the_total():
    model = tiny_model("llama", num_layers=6)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    cache = EvictionCache(model, "pyramidkv", budget=24, buffer=2, window=4)
    budgets = [layer.budget for layer in cache.layers]
    assert sum(budgets) == 6 * 24
    assert all(a > b for a, b in zip(budgets, budgets[1:], strict=False)), budgets
    assert budgets[0] > 24 > budgets[-1] >= 4
    ids = torch.randint(3, 100, (1, 40), generator=gen(305))
    model.generate(ids, max_new_tokens=10, do_sample=False, cache=cache)
    for layer, m in zip(cache.layers, budgets, strict=False):
        assert layer.n <= m + 2 and layer.peak <= max(m + 2, 40)
    # M <= window: uniform budgets
    assert PyramidKVPolicy(window=32).budgets(4, 16) == [16] * 4
    for layers, budget in [(30, 64), (7, 100), (2, 40)]:
        b = PyramidKVPolicy().budgets(layers, budget)
        assert sum(b) == layers * budget and b == sorted(b, reverse=True)


def test_keydiff_drops_key_most_similar_to_mean():
    keys = torch.zeros(1, 1, 5, 4)
    keys[0, 0, :4] = 3 * torch.eye(4)  # four orthogonal keys
    keys[0, 0, 4] = torch.ones(4)  # the mean direction of all unit keys
    layer = _layer(KeyDiffPolicy())
    _feed(layer, keys)
    scores = layer.policy.score(layer)[0, 0]
    assert torch.allclose(scores, torch.tensor([-0.5, -0.5, -0.5, -0.5, -1.0]), atol=1e-5)
    layer.evict(4)
    assert _kept(layer) == [[0, 1, 2, 3]]


def test_keydiff_is_minus_the_cosine_to_the_mean_unit_key():
    keys = torch.randn(2, 2, 9, 8, generator=gen(330)) * torch.linspace(0.5, 4, 9)[:, None]
    layer = _layer(KeyDiffPolicy())
    _feed(layer, keys)
    unit = keys / keys.norm(dim=-1, keepdim=True)
    mean = unit.mean(2, keepdim=True)
    want = -(keys * mean).sum(-1) / (keys.norm(dim=-1) * mean.norm(dim=-1))
    assert torch.allclose(layer.policy.score(layer), want, atol=1e-6)


def test_rkv_drops_duplicated_keys_before_unique_ones():
    d = 8
    eye = torch.eye(d)
    # prefix: 0, 2, 4 are copies of one key; 1, 3, 5 unique; 6, 7 the window
    rows = [eye[0], eye[1], eye[0], eye[2], eye[0], eye[3], eye[4], eye[5]]
    keys = torch.stack(rows)[None, None]
    queries = torch.zeros(1, 2, 8, d)  # uniform attention: importance is equal everywhere
    for keep, expect in [(7, [1, 2, 3, 4, 5, 6, 7]), (6, [1, 3, 4, 5, 6, 7])]:
        layer = _layer(RKVPolicy(window=2))
        _feed(layer, keys, queries)
        redundancy = layer.policy.redundancy(layer)[0, 0]
        # the newest copy keeps nothing of its duplicates, the oldest the most
        assert redundancy[0] > redundancy[2] > redundancy[4]
        assert torch.allclose(redundancy[4], redundancy[1])
        layer.evict(keep)
        assert _kept(layer) == [expect]


def test_random_is_reproducible_per_seed_and_differs_across_seeds():
    model = tiny_model("llama")
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, 100, (1, 30), generator=torch.Generator().manual_seed(4))

    def kept(seed):
        cache = EvictionCache(model, "random", budget=8, buffer=2, seed=seed)
        model.generate(ids, max_new_tokens=6, do_sample=False, cache=cache)
        return [cache.resident_positions(i).tolist() for i in cache.evicted]

    assert kept(0) == kept(0)
    assert kept(0) != kept(1)


def test_bad_policy_arguments():
    with pytest.raises(KVBoundError, match="pooling"):
        SnapKVPolicy(pooling="median")
    with pytest.raises(KVBoundError, match="recent_ratio"):
        H2OPolicy(recent_ratio=2.0)
    with pytest.raises(KVBoundError, match="mix_lambda"):
        RKVPolicy(mix_lambda=-1.0)
    assert SnapKVPolicy(query_aware=True).describe()["query_aware"] is True


# --------------------------------------------------------------------------------------------
# same rules for every method
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_every_policy_gets_the_same_default_sinks_from_class_and_build_cache(model, name):
    from kvbound import TrimKVCache
    from kvbound.generation import build_cache
    from kvbound.policies.base import DEFAULT_SINKS

    gates = RetentionGates.for_model(model, bias_init=2.0, seed=0)
    direct = EvictionCache(model, name, budget=32, buffer=4)
    built, _, sinks = build_cache(model, name, budget=32, buffer=4, gates=gates)
    assert direct.sinks == built.sinks == sinks == DEFAULT_SINKS == 4
    assert TrimKVCache(model, budget=32).sinks == DEFAULT_SINKS
    assert EvictionCache(model, name, budget=3, buffer=4).sinks == 2  # always inside M
    assert EvictionCache(model, name, budget=32, buffer=4, sinks=0).sinks == 0


@pytest.mark.parametrize(("name", "default"), [("snapkv", 32), ("pyramidkv", 32), ("rkv", 8)])
@pytest.mark.parametrize("budget", [8, 32, 64, 128])
def test_observation_window_leaves_room_to_select(model, name, default, budget):
    cache = EvictionCache(model, name, budget=budget, buffer=4)
    window = cache.settings()["policy"]["window"]
    assert window == min(default, budget // 2) and window < budget
    assert cache.eviction_layers[0].queries.w == window  # the hook buffers that many queries
    set_by_user = EvictionCache(model, name, budget=budget, buffer=4, window=5)
    assert set_by_user.settings()["policy"]["window"] == 5
    if name == "pyramidkv":  # the window is inside every layer's budget, total unchanged
        assert cache.settings()["layer_budget_total"] == budget * len(cache.eviction_layers)


def test_snapkv_at_small_budget_is_not_the_recency_window(model):
    """At M=32 a window of 32 would keep the last 32 tokens (StreamingLLM without sinks)."""
    ids = torch.randint(3, 100, (1, 96), generator=gen(411))
    kept = {}
    for name in ("snapkv", "streaming"):
        cache = EvictionCache(model, name, budget=32, buffer=0, sinks=0)
        with torch.no_grad():
            model(ids, cache=cache)
            model(ids[:, :1], cache=cache)  # evicts down to M, then appends this token
        kept[name] = cache.resident_positions(0)[0].tolist()
    assert all(len(row) == 32 + 1 for row in kept["snapkv"])
    assert kept["snapkv"] != kept["streaming"]
    window = EvictionCache(model, "snapkv", budget=32, buffer=0).settings()["policy"]["window"]
    assert window == 16
    assert all(set(range(96 - window, 97)) <= set(row) for row in kept["snapkv"])
    assert all(min(row) < 96 - 32 for row in kept["snapkv"])  # it selected older tokens


def test_rules_check_refuses_methods_run_under_different_rules(model):
    from kvbound.eval.stats import check_same_rules

    rows = [{"label": m, "settings": EvictionCache(model, m, budget=32, buffer=4).settings()}
            for m in ("trimkv", "snapkv", "pyramidkv", "streaming")]
    check_same_rules(rows + [{"label": "full", "settings": None}])
    odd = {"label": "h2o", "settings": EvictionCache(model, "h2o", budget=32, buffer=4,
                                                     sinks=0).settings()}
    with pytest.raises(KVBoundError, match="different rules.*h2o"):
        check_same_rules(rows + [odd])
    other_buffer = {"label": "tova", "settings": EvictionCache(model, "tova", budget=32,
                                                               buffer=8).settings()}
    with pytest.raises(KVBoundError, match="different rules"):
        check_same_rules(rows + [other_buffer])


@pytest.mark.parametrize("name", ["tova", "snapkv", "pyramidkv", "rkv"])
def test_attention_policies_score_a_layer_with_no_query_yet(name):
    """Before any query was buffered the attention part is empty: scores are defined (zeros
    for TOVA; SnapKV, PyramidKV and R-KV still keep their window), never an index error."""
    from types import SimpleNamespace

    b, h, n, d = 2, 2, 7, 4
    pos = torch.arange(n).expand(b, h, n).clone()
    layer = SimpleNamespace(keys_=torch.randn(b, h, n, d, generator=gen(5)), positions=pos,
                            queries=SimpleNamespace(queries=None, valid=None, pos=None),
                            row_seen=torch.full((b,), n), budget=4, n=n, layer_idx=0)
    policy = get_policy(name).fit_budget(8)
    scores = policy.score(layer)
    assert scores.shape == (b, h, n)
    if name == "tova":
        assert torch.equal(scores, torch.zeros(b, h, n))
    else:  # the window (last min(default, M/2) tokens) is kept, the rest ties
        window = policy.window
        assert torch.isinf(scores[..., n - window:]).all()
        assert torch.isfinite(scores[..., : n - window]).all()


def test_recent_window_is_exactly_the_last_w_real_tokens():
    from types import SimpleNamespace

    from kvbound.policies.attention_rows import recent_window

    pos = torch.tensor([[-1, -1, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]])[:, None]
    layer = SimpleNamespace(positions=pos, row_seen=torch.tensor([6, 8]))
    got = recent_window(layer, 3)[:, 0]
    assert got.tolist() == [[False] * 5 + [True] * 3, [False] * 5 + [True] * 3]
    assert not recent_window(layer, 0).any()
    everything = recent_window(layer, 8)[:, 0]  # the first token (position 0) included
    assert everything.tolist() == [[False, False] + [True] * 6, [True] * 8]


@pytest.mark.parametrize(("layers", "budget", "window"), [(4, 5, 4), (6, 9, 8), (30, 64, 32)])
def test_pyramid_budgets_fall_even_with_one_prefix_token(layers, budget, window):
    budgets = PyramidKVPolicy(window=window).budgets(layers, budget)
    assert sum(budgets) == layers * budget and min(budgets) >= window
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]


def test_pyramid_budgets_are_exact_where_the_arithmetic_is():
    """Prefix 4 over 5 layers at beta 4/3: the line 5, 4.5, 4, 3.5, 3 (3 is 4 / (4/3) in exact
    arithmetic, not in floats); floors 5, 4, 4, 3, 3, the one token left to the first layer."""
    assert PyramidKVPolicy(window=2, beta=4 / 3).budgets(5, 6) == [8, 6, 6, 5, 5]


def test_trimkv_score_is_the_papers_log_retention():
    """TRIM-KV keeps the tokens of largest beta_i^(t - i): score = (t - i) * log beta_i
    (arXiv 2512.03324, eq. 3), t the tokens seen by the row, i the token's position."""
    from types import SimpleNamespace

    from kvbound.policies.retention import RetentionPolicy

    pos = torch.tensor([[[0, 3, 5, 9], [1, 2, 6, 8]]])  # (B=1, H=2, n=4)
    log_beta = -torch.tensor([[[0.5, 0.01, 0.2, 1.0], [0.05, 0.3, 0.02, 0.4]]])
    layer = SimpleNamespace(positions=pos, log_beta=log_beta, row_seen=torch.tensor([10]),
                            log_alpha=None)
    expected = (10 - pos).float() * log_beta
    assert torch.allclose(RetentionPolicy().score(layer), expected)
    # gates with an initial importance: log alpha_i + (t - i) log beta_i
    layer.log_alpha = torch.tensor([[[0.0, -3.0, 1.0, 0.5], [2.0, 0.0, -1.0, 0.0]]])
    assert torch.allclose(RetentionPolicy().score(layer), expected + layer.log_alpha)


def test_trimkv_lookahead_scores_retention_over_the_next_n_queries():
    """lookahead=n (the official code's lookahead_steps): log of sum_{k<n} beta^(t - i + k),
    against a direct sum; it can keep a slowly decaying token over a fast one that the one-step
    score ranks first, and n=1 is the paper's score."""
    from types import SimpleNamespace

    from kvbound.cache import TrimKVCache
    from kvbound.policies.retention import RetentionPolicy, lookahead_bonus

    pos = torch.tensor([[[0, 3, 5, 9]]])
    log_beta = -torch.tensor([[[0.001, 0.3, 0.2, 1.0]]])
    layer = SimpleNamespace(positions=pos, log_beta=log_beta, row_seen=torch.tensor([10]),
                            log_alpha=None)
    age = (10 - pos).double()
    for n in (1, 2, 4, 32):
        direct = torch.log(sum(torch.exp((age + k) * log_beta.double()) for k in range(n)))
        assert torch.allclose(RetentionPolicy(lookahead=n).score(layer).double(), direct,
                              rtol=1e-5, atol=1e-5), n
    assert torch.equal(RetentionPolicy(lookahead=1).score(layer), RetentionPolicy().score(layer))
    # beta = 1 exactly (a saturated gate) and beta -> 0 are finite: log n and ~0
    bonus = lookahead_bonus(torch.tensor([0.0, -1e-9, -30.0]), 8)
    assert torch.allclose(bonus, torch.tensor([math.log(8), math.log(8), 0.0]), atol=1e-5)
    # same score now (age 1 at log beta -1.0 vs age 10 at -0.1), the slow one wins with lookahead
    two = SimpleNamespace(positions=torch.tensor([[[0, 9]]]), row_seen=torch.tensor([10]),
                          log_beta=torch.tensor([[[-0.1, -1.0]]]), log_alpha=None)
    plain, ahead = RetentionPolicy().score(two)[0, 0], RetentionPolicy(lookahead=16).score(two)[0, 0]
    assert torch.isclose(plain[0], plain[1]) and ahead[0] > ahead[1] + 1.0
    for bad in (0, -1, 2.5, True):
        with pytest.raises(KVBoundError, match="lookahead"):
            RetentionPolicy(lookahead=bad)
    model = tiny_model("llama", seed=0)
    RetentionGates.for_model(model, seed=0).attach(model)
    cache = TrimKVCache(model, budget=8, buffer=2, lookahead=4)
    assert cache.settings()["policy"] == {"policy": "trimkv", "lookahead": 4}


def test_trimkv_attention_weight_adds_the_latest_querys_log_attention():
    """attention_weight=w: score + w log(a + eps), a the latest query's attention per KV head
    (the mean over its query group, from the post-RoPE query and resident keys); off by default
    (the paper's score and settings); in a cache it buffers one query and changes what stays."""
    from types import SimpleNamespace

    from kvbound.cache import TrimKVCache
    from kvbound.policies.retention import ATTENTION_EPS, RetentionPolicy

    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([[[0, 3, 5, 9], [1, 2, 6, 8]]])  # (B=1, H_kv=2, n=4)
    keys = torch.randn(1, 2, 4, 8, generator=g)
    query = torch.randn(1, 4, 1, 8, generator=g)  # 2 query heads per KV head
    log_beta = -torch.rand(1, 2, 4, generator=g)
    layer = SimpleNamespace(positions=pos, log_beta=log_beta, row_seen=torch.tensor([10]),
                            log_alpha=None, keys_=keys, queries=SimpleNamespace(
                                queries=query, valid=torch.tensor([[True]]),
                                pos=torch.tensor([[9]])))
    probs = torch.softmax(query.view(1, 2, 2, 8) @ keys.transpose(-1, -2) / math.sqrt(8), -1)
    expected = (10 - pos).float() * log_beta + 0.5 * torch.log(probs.mean(2) + ATTENTION_EPS)
    assert torch.allclose(RetentionPolicy(attention_weight=0.5).score(layer), expected, atol=1e-5)
    assert RetentionPolicy().query_window == 0 and RetentionPolicy(attention_weight=1).query_window == 1
    for bad in (-0.1, True, "1"):
        with pytest.raises(KVBoundError, match="attention_weight"):
            RetentionPolicy(attention_weight=bad)
    model = tiny_model("llama", seed=0)
    RetentionGates.for_model(model, seed=0).attach(model)
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=g)

    def resident(**kw):
        cache = TrimKVCache(model, budget=8, buffer=2, sinks=0, **kw)
        with torch.no_grad():
            for i in range(ids.shape[1]):  # decode: one token a step, evicting as it goes
                model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True,
                      position_ids=torch.tensor([[i]]))
        return cache, cache.resident_positions(0)

    plain, kept = resident()
    mixed, kept_mixed = resident(attention_weight=2.0)
    assert "attention_weight" not in plain.settings()["policy"]
    assert mixed.settings()["policy"]["attention_weight"] == 2.0
    assert not torch.equal(kept, kept_mixed)


def test_policy_settings_accept_their_smallest_values_and_refuse_below():
    for cls in (SnapKVPolicy, PyramidKVPolicy, RKVPolicy):
        cls(window=1, kernel=1)  # no pooling, a one-query window: valid
        with pytest.raises(KVBoundError, match="must be >= 1"):
            cls(kernel=0)
        with pytest.raises(KVBoundError, match="must be >= 1"):
            cls(window=0)
    RKVPolicy(block=1)
    with pytest.raises(KVBoundError, match="must be >= 1"):
        RKVPolicy(block=0)
    for mix in (0.0, 1.0):  # both ends of [0, 1]
        RKVPolicy(mix_lambda=mix)
    for mix in (-0.01, 1.01):
        with pytest.raises(KVBoundError, match="mix_lambda must be in"):
            RKVPolicy(mix_lambda=mix)
    PyramidKVPolicy(beta=1.0)
    assert PyramidKVPolicy().budgets(1, 8) == [8]  # one evicted layer: the whole budget
    from kvbound.policies.base import window_for

    assert [window_for(b, 32) for b in (1, 2, 3, 4, 64, 65)] == [1, 1, 1, 2, 32, 32]
    with pytest.raises(KVBoundError, match="beta must be >= 1"):
        PyramidKVPolicy(beta=0.99)
    H2OPolicy(block=1)
    for ratio in (0.0, 1.0):
        H2OPolicy(recent_ratio=ratio)
    with pytest.raises(KVBoundError, match="block must be >= 1"):
        H2OPolicy(block=0)
    for ratio in (-0.01, 1.01):
        with pytest.raises(KVBoundError, match="recent_ratio must be in"):
            H2OPolicy(recent_ratio=ratio)


def test_rkv_redundancy_is_the_softmax_of_mean_similarity():
    """r_j = softmax_j(mean_i S_ij), S the cosine similarity with a zero diagonal, where in each
    row the most recent similar key (S > threshold) is zeroed (arXiv 2505.24133)."""
    from types import SimpleNamespace

    # key 1's only similar key is key 0: the most recent similar key can be the first one
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.2], [0.1, -1.0]])
    layer = SimpleNamespace(keys_=keys[None, None], positions=torch.arange(5)[None, None])
    unit = keys / keys.norm(dim=-1, keepdim=True)
    sim = unit @ unit.T
    sim.fill_diagonal_(0.0)
    for i in range(5):
        similar = [j for j in range(5) if sim[i, j] > 0.5]
        if similar:
            sim[i, max(similar)] = 0.0
    expected = torch.softmax(sim.sum(0) / 5, dim=-1)
    got = RKVPolicy(threshold=0.5).redundancy(layer)[0, 0]
    assert torch.allclose(got, expected, atol=1e-6)


def test_rkv_similarity_threshold_is_strict():
    """Only keys with S > threshold are "similar": at threshold 1, exact duplicates (S = 1) are
    not, so no similarity is zeroed."""
    from types import SimpleNamespace

    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    layer = SimpleNamespace(keys_=keys[None, None], positions=torch.arange(3)[None, None])
    sim = keys @ keys.T
    sim.fill_diagonal_(0.0)
    assert sim[0, 1] == 1.0
    got = RKVPolicy(threshold=1.0).redundancy(layer)[0, 0]
    assert torch.allclose(got, torch.softmax(sim.sum(0) / 3, dim=-1), atol=1e-6)


@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
def test_rkv_score_mixes_importance_and_redundancy(mix):
    """z = lambda * importance - (1 - lambda) * redundancy outside the window, +inf inside."""
    from kvbound.policies.attention_rows import recent_window

    keys = torch.randn(1, 2, 14, 8, generator=gen(570))
    queries = torch.randn(1, 4, 14, 8, generator=gen(571))
    policy = RKVPolicy(window=3, mix_lambda=mix)
    layer = _layer(policy, budget=8)
    _feed(layer, keys, queries)
    window = recent_window(layer, 3)
    imp, red = policy.importance(layer, window), policy.redundancy(layer)
    assert imp[~window].abs().sum() > 0 and red.abs().sum() > 0
    want = (mix * imp - (1 - mix) * red).masked_fill(window, math.inf)
    assert torch.allclose(policy.score(layer), want, atol=1e-7)
