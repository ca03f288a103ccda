"""The future-attention oracle: its tables equal the model's own attention, its cache keeps what
the tables rank highest, and at a budget that holds everything it is the full cache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvbound.cache import EvictionCache
from kvbound.errors import KVBoundError
from kvbound.eval.fidelity import ORACLE, Window, bounded_logprobs, run_fidelity
from kvbound.eval.oracle import future_attention_tables, oracle_policy
from kvbound.testing import ByteTokenizer, tiny_model
from tests.oracle import EvictionSpy
from tests.rng import gen


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=3)


def _ids(b=2, t=40, seed=0):
    return torch.randint(3, 120, (b, t), generator=torch.Generator().manual_seed(seed))


def _eager_future(model, ids, times, horizon):
    """The same sums from transformers' eager attention weights, computed independently."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(input_ids=ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    h_kv = model.config.num_key_value_heads
    out = {}
    for layer, a in enumerate(att):  # (B, Hq, T, T)
        b, hq, t, _ = a.shape
        a = a.view(b, h_kv, hq // h_kv, t, t).mean(2)
        out[layer] = torch.stack([a[:, :, s:min(s + horizon, t)].sum(2) for s in times], 2)
    return out


@pytest.mark.parametrize("horizon", [None, 7])
def test_tables_are_the_models_future_attention(model, horizon):
    ids = _ids()
    tables = future_attention_tables(model, ids, stride=8, horizon=horizon)
    times = [min(s, 40) for s in range(0, 40 + 8, 8)]  # J = ceil(T / stride) + 1
    want = _eager_future(model, ids, times, horizon or 40)
    assert sorted(tables) == sorted(want)
    for layer, table in tables.items():
        assert table.shape == (2, model.config.num_key_value_heads, len(times), 40)
        torch.testing.assert_close(table, want[layer], atol=1e-5, rtol=1e-4)
        # every query's attention sums to one: the mass at time s is the number of its queries
        mass = torch.tensor([min(horizon or 40, 40 - s) for s in times], dtype=torch.float32)
        torch.testing.assert_close(table.sum(-1), mass.expand_as(table.sum(-1)), atol=1e-4,
                                   rtol=1e-5)


def test_oracle_cache_keeps_the_top_future_attention(model):
    """Every eviction keeps the cache's keep rule applied to the tables' scores at that time."""
    ids = _ids(seed=1)
    policy = oracle_policy(model, ids, stride=4)
    # buffer 3 against stride 4: decisions fall on every residue of the stride
    cache = EvictionCache(model, policy, budget=8, buffer=3, sinks=0)
    spy = EvictionSpy().install(cache)
    seen_scores, seen_times = [], []
    score = policy.score

    def recording(layer):
        s = score(layer)
        j = min((int(layer.row_seen[0]) + 3) // 4, policy.tables[layer.layer_idx].shape[2] - 1)
        want = policy.tables[layer.layer_idx][0, :, j].gather(-1, layer.positions[0].clamp(0))
        assert torch.equal(s[0], want)
        seen_scores.append(j)
        seen_times.append(int(layer.row_seen[0]))
        return s

    policy.score = recording
    bounded_logprobs(model, ids, cache, protocol="decode", buffer=3)
    assert spy.checked > 0 and len(set(seen_scores)) > 3
    assert {t % 4 for t in seen_times} == {0, 1, 2, 3}
    assert cache.stats().peak_tokens_per_head <= 8 + 3


def test_oracle_with_room_for_everything_is_the_full_cache(model):
    windows = [Window(f"w{i}", _ids(1, 56, seed=i)[0]) for i in range(2)]
    # budget 40 + buffer 16 hold all 56 tokens: nothing is ever evicted
    res = run_fidelity(model, ByteTokenizer(), windows, methods=[ORACLE], budgets=[40],
                       sinks=0, progress=False)
    (row,) = res["results"]
    assert row["kl_mean"] < 1e-6 and row["peak_tokens_per_head"] == 56
    assert row["settings"]["policy"] == {
        "policy": "oracle", "stride": 16, "horizon": None}


def test_oracle_refuses_tables_of_other_ids(model):
    policy = oracle_policy(model, _ids(1, 24), stride=4)
    assert model.config.num_key_value_heads != 1  # rows and heads told apart
    fine = EvictionCache(model, policy, budget=8, buffer=4, sinks=0)
    bounded_logprobs(model, _ids(1, 24), fine, protocol="decode", buffer=4)  # its own ids: fine
    assert fine.stats().evictions > 0
    cache = EvictionCache(model, policy, budget=8, buffer=4, sinks=0)
    with pytest.raises(KVBoundError, match="tables hold 1 rows"):
        bounded_logprobs(model, _ids(2, 24), cache, protocol="decode", buffer=4)
    with pytest.raises(KVBoundError, match="horizon must be"):
        future_attention_tables(model, _ids(1, 24), horizon=0)
    # more tokens than the tables cover: refused, not read from the wrong place
    longer = EvictionCache(model, policy, budget=8, buffer=4, sinks=0)
    with pytest.raises(KVBoundError, match="cover 24 tokens"):
        bounded_logprobs(model, _ids(1, 40), longer, protocol="decode", buffer=4)
    # a decision once all 24 tokens are in (time T) is covered: nothing attends any more
    at_end = SimpleNamespace(layer_idx=0, row_seen=torch.tensor([24]),
                             positions=torch.arange(8).view(1, 1, 8).repeat(1, 2, 1))
    assert torch.equal(policy.score(at_end), torch.zeros(1, 2, 8))
    at_end.row_seen += 1
    with pytest.raises(KVBoundError, match="has seen 25"):
        policy.score(at_end)


def _tables_of_form(log_beta, log_alpha, stride, t):
    """Tables whose distribution at each decision time is exactly softmax of the two-number
    score over the keys before it: what a perfect fit recovers."""
    j = -(-t // stride) + 1
    times = torch.arange(0, j * stride, stride).clamp(max=t)
    keys = torch.arange(t)
    cand = keys < times[:, None]
    age = (times[:, None] - keys).clamp(min=0).float()
    score = (log_alpha[..., None, :] + age * log_beta[..., None, :]).masked_fill(~cand, -torch.inf)
    return {0: torch.where(cand, score.softmax(-1).nan_to_num(0.0), 0.0)}


def test_fit_retention_recovers_a_ranking_of_its_form():
    """Tables made by a known score: the form with an offset fits them almost exactly, the
    paper's form (no offset) only when the tables have none; the fitted scores rank the keys of
    the last decision as the truth does."""
    from kvbound.eval.oracle import fit_retention

    t, stride = 48, 4
    log_beta = -torch.rand(1, 2, t, generator=torch.Generator().manual_seed(1)) * 0.3
    log_alpha = torch.randn(1, 2, t, generator=torch.Generator().manual_seed(2)) * 2
    with_offset = _tables_of_form(log_beta, log_alpha, stride, t)
    _, off, kl_off = fit_retention(with_offset, stride, form="trimkv+offset", steps=400, lr=0.1)
    _, none, kl_plain = fit_retention(with_offset, stride, form="trimkv", steps=400, lr=0.1)
    assert kl_off < 0.05 < kl_plain and none == {}
    assert off[0].shape == (1, 2, t)
    plain_tables = _tables_of_form(log_beta, torch.zeros_like(log_alpha), stride, t)
    lb, _, kl = fit_retention(plain_tables, stride, form="trimkv", steps=400, lr=0.1)
    assert kl < 0.05
    truth = (t - torch.arange(t)) * log_beta[0, 0]
    fitted = (t - torch.arange(t)) * lb[0][0, 0]
    top = truth.topk(8).indices.sort().values
    assert torch.equal(fitted.topk(8).indices.sort().values, top)
    with pytest.raises(KVBoundError, match="form must be"):
        fit_retention(plain_tables, stride, form="lookahead")


def test_fit_retention_topm_fits_the_sequential_cut_a_cache_makes():
    """``topm=M``: after the ListNet fit, a fit to the per-head cache's own cut (evicted keys
    never return) throws away far less future attention in that cut, in both forms."""
    from kvbound.eval.oracle import decision_ages, decision_times, fit_retention
    from kvbound.train.rank_loss import RankLists, topm_lost_mass

    t, stride, keep = 64, 4, 6
    j = -(-t // stride) + 1
    cand = torch.arange(t) < decision_times(j, stride, t)[:, None]
    # each key's future attention comes in bursts: no one-shot ranking fits it
    flow = torch.rand(1, 2, j, t, generator=torch.Generator().manual_seed(3)) ** 8 * cand
    age = decision_ages(j, stride, t)

    def lost(lb, off):
        s = age * lb[0][:, :, None, :] + (off[0][:, :, None, :] if off else 0.0)
        s = s.masked_fill(~cand, -torch.inf)
        lists = RankLists(flow, s, cand.expand_as(s), torch.ones(1, 2, j))
        return topm_lost_mass(lists, keep, sequential=True)[1]

    for form in ("trimkv", "trimkv+offset"):
        one_shot = lost(*fit_retention({0: flow}, stride, form=form, steps=200, lr=0.1)[:2])
        in_seq = lost(*fit_retention({0: flow}, stride, form=form, steps=200, lr=0.1,
                                     topm=keep)[:2])
        assert in_seq < 0.5 * one_shot
    with pytest.raises(KVBoundError, match="topm"):
        fit_retention({0: flow}, stride, topm=0)


def test_fitted_oracle_scores_with_its_fitted_numbers(model):
    from kvbound.policies.oracle import FittedRetentionOracle

    lb, a = -torch.rand(1, 2, 10, generator=gen(601)), torch.randn(1, 2, 10, generator=gen(602))
    pos = torch.tensor([[[0, 4, 7], [1, 2, 9]]])
    layer = SimpleNamespace(layer_idx=3, row_seen=torch.tensor([10]), positions=pos)
    policy = FittedRetentionOracle(log_beta={3: lb}, offset={3: a})
    want = (10 - pos).float() * lb.gather(-1, pos) + a.gather(-1, pos)
    assert torch.allclose(policy.score(layer), want)
    assert torch.allclose(FittedRetentionOracle(log_beta={3: lb}).score(layer),
                          (10 - pos).float() * lb.gather(-1, pos))
    layer.row_seen = torch.tensor([11])
    with pytest.raises(KVBoundError, match="has seen 11"):
        policy.score(layer)
    # a fidelity run: the fitted oracle is an oracle entry with its fit recorded
    windows = [Window(f"w{i}", _ids(1, 40, seed=i)[0]) for i in range(2)]
    res = run_fidelity(model, ByteTokenizer(), windows, budgets=[8], buffer=4, sinks=0,
                       methods=[("fit", ORACLE, {"horizon": 8, "fit": "trimkv+offset",
                                                 "fit_steps": 20})], progress=False)
    (row,) = res["results"]
    assert row["settings"]["policy"]["policy"] == "oracle-fit"
    assert row["settings"]["policy"]["form"] == "trimkv+offset" and row["kl_mean"] > 0
