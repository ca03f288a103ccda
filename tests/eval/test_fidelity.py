"""Fidelity evaluation on a tiny model: exactness of the decode protocol and metric sanity."""

from __future__ import annotations

import pytest
import torch

from kvbound.cache import EvictionCache
from kvbound.errors import KVBoundError
from kvbound.eval.fidelity import Window, bounded_logprobs, run_fidelity
from kvbound.gates import RetentionGates
from kvbound.testing import ByteTokenizer, tiny_model


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama", seed=1)
    RetentionGates.for_model(m, bias_init=2.0, init_std=0.5).attach(m)
    return m


def _windows(n=3, t=64):
    g = torch.Generator().manual_seed(0)
    return [Window(f"w{i}", torch.randint(3, 120, (t,), generator=g)) for i in range(n)]


def test_decode_protocol_equals_token_by_token_decoding(model):
    """Feeding chunks of `buffer` tokens reproduces one-token-at-a-time decoding exactly."""
    ids = _windows(1)[0].ids[None]
    cache = EvictionCache(model, "trimkv", budget=8, buffer=4)
    chunked = bounded_logprobs(model, ids, cache, protocol="decode", buffer=4)
    cache = EvictionCache(model, "trimkv", budget=8, buffer=4)
    with torch.no_grad():
        steps = [model(ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])]
    stepwise = torch.log_softmax(torch.cat(steps, 1).float(), -1)
    assert torch.allclose(chunked, stepwise, atol=1e-4)


def test_metrics(model):
    res = run_fidelity(model, ByteTokenizer(), _windows(), methods=["full", "streaming", "trimkv"],
                       budgets=[8, 60], buffer=4, batch_size=2, progress=False)
    by = {(r["label"], r["budget"]): r for r in res["results"]}
    assert by[("full", 8)]["kl_mean"] == 0 and by[("full", 8)]["top1_agreement"] == 1
    for m in ("streaming", "trimkv"):
        assert by[(m, 60)]["kl_mean"] < 1e-6  # budget above the length: no eviction
        assert by[(m, 8)]["kl_mean"] > 1e-3
        assert by[(m, 8)]["peak_tokens_per_head"] <= 8 + 4
        assert 0 <= by[(m, 8)]["top1_agreement"] <= 1 and by[(m, 8)]["ppl_ratio"] > 0
        assert by[(m, 8)]["windows"] == 3
    assert by[("streaming", 8)]["sinks"] == 4


@pytest.mark.portability
def test_batched_windows_match_single(model):
    kw = dict(methods=["streaming"], budgets=[8], buffer=4, progress=False)
    batched = run_fidelity(model, ByteTokenizer(), _windows(), batch_size=3, **kw)
    single = run_fidelity(model, ByteTokenizer(), _windows(), batch_size=1, **kw)
    a, b = batched["results"][0], single["results"][0]
    assert a["kl_per_window"] == pytest.approx(b["kl_per_window"], rel=1e-3, abs=1e-6)


def test_context_protocol_compresses_once(model, monkeypatch):
    from kvbound.cache.layer import EvictionLayer

    real, calls = EvictionLayer.evict, []

    def counting(self, keep):
        if self.n > keep:
            calls.append((self.layer_idx, self.n, keep))
        return real(self, keep)

    monkeypatch.setattr(EvictionLayer, "evict", counting)
    res = run_fidelity(model, ByteTokenizer(), _windows(2), methods=["streaming"],
                       budgets=[8], buffer=4, protocol="context", context_len=32, progress=False)
    r = res["results"][0]
    assert res["protocol"] == "context" and r["positions"] == 2 * (64 - 32 - 1)
    assert r["kl_mean"] > 0
    # the two windows run as one batch: once per layer, from the 32-token context down to the
    # budget, and never again while the rest of the window is scored
    layers = model.config.num_hidden_layers
    assert sorted(calls) == [(i, 32, 8) for i in range(layers)]


def test_budget_too_large_for_window(model):
    with pytest.raises(KVBoundError, match="seq-len"):
        run_fidelity(model, ByteTokenizer(), _windows(1, 16), methods=["streaming"], budgets=[32],
                     progress=False)


def test_sweep_runs_every_method_under_the_same_rules_per_regime(model):
    from kvbound.eval.sweep import fidelity_sweep

    res = fidelity_sweep(model, ByteTokenizer(), _windows(4), budgets=[8, 16], buffer=4,
                         methods=["full", "trimkv", "streaming", "snapkv", "pyramidkv", "knorm"],
                         fewer_windows={"knorm": 2}, progress=False)
    assert set(res["regimes"]) == {"0", "4"}
    for sinks, r in res["regimes"].items():
        bounded = [x for x in r["results"] if x["label"] != "full"]
        assert {x["sinks"] for x in bounded} == {int(sinks)}
        for m in (8, 16):
            rules = {(x["settings"]["sinks"], x["settings"]["buffer"],
                      x["settings"]["layer_budget_total"], x["settings"]["positions"])
                     for x in bounded if x["budget"] == m}
            assert rules == {(int(sinks), 4, m * model.config.num_hidden_layers, "auto")}
        snap = next(x for x in bounded if x["label"] == "snapkv" and x["budget"] == 8)
        assert snap["settings"]["policy"]["window"] == 4  # min(32, M/2): room to select
        for x in bounded:
            assert x["windows"] == (2 if x["label"] == "knorm" else 4)
            assert x["kl_ci"][0] <= x["kl_mean"] <= x["kl_ci"][1]
        for c in r["comparisons"]:
            v = c["vs_best"]
            assert v["other"] != "trimkv" and v["ci"][0] <= v["mean"] <= v["ci"][1]
            assert 0 <= v["wins"] <= v["n"] == 4 or v["other"] == "knorm"
        assert r["comparisons"][0]["vs_best_at_2m"]["other_budget"] == 16


def test_sweep_refuses_a_method_that_ran_under_other_rules(model, monkeypatch):
    from kvbound.eval import sweep
    from kvbound.generation import build_cache as real

    def unfair(model, method, **kw):  # streaming quietly keeps its own 4 sinks
        if method == "streaming":
            kw["sinks"] = 4
        return real(model, method, **kw)

    monkeypatch.setattr("kvbound.generation.build_cache", unfair)
    with pytest.raises(KVBoundError, match="different rules"):
        sweep.fidelity_sweep(model, ByteTokenizer(), _windows(2), budgets=[8], buffer=4,
                             methods=["trimkv", "streaming"], regimes=(0,), progress=False)


def test_sweep_store_resumes_without_rerunning_and_refuses_other_settings(model, tmp_path,
                                                                           monkeypatch):
    from kvbound.eval import sweep

    store = tmp_path / "partial.json"
    kw = dict(budgets=[8], buffer=4, methods=["trimkv", "streaming"], regimes=(0,),
              progress=False)
    first = sweep.fidelity_sweep(model, ByteTokenizer(), _windows(2), store=store, **kw)

    def refuse(*a, **k):
        raise AssertionError("a stored (regime, method) ran again")

    monkeypatch.setattr(sweep, "run_fidelity", refuse)
    again = sweep.fidelity_sweep(model, ByteTokenizer(), _windows(2), store=store, **kw)
    assert again["regimes"]["0"]["comparisons"] == first["regimes"]["0"]["comparisons"]
    subset = sweep.fidelity_sweep(model, ByteTokenizer(), _windows(2), store=store,
                                  **{**kw, "methods": ["trimkv"]})  # e.g. the finished part
    assert [r["label"] for r in subset["regimes"]["0"]["results"]] == ["trimkv"]
    with pytest.raises(KVBoundError, match="other windows or settings"):
        sweep.fidelity_sweep(model, ByteTokenizer(), _windows(3), store=store, **kw)


def test_regimes_run_in_separate_stores_merge_into_one_sweep(model, tmp_path, monkeypatch):
    """fidelity_sweep.py --merge-store: regimes run in two processes, each with its own store,
    then merged; the whole sweep reruns nothing and equals one run of both regimes. A store of
    other windows is refused."""
    from kvbound.eval import sweep
    from tests.helpers import load_benchmark

    bench = load_benchmark("fidelity_sweep")
    kw = dict(budgets=[8], buffer=4, methods=["trimkv", "streaming"], progress=False)
    whole = sweep.fidelity_sweep(model, ByteTokenizer(), _windows(2), regimes=(0, 4), **kw)
    for sinks in (0, 4):
        sweep.fidelity_sweep(model, ByteTokenizer(), _windows(2), regimes=(sinks,),
                             store=tmp_path / f"s{sinks}.json", **kw)
    store = tmp_path / "merged.json"
    bench.merge_stores(store, [tmp_path / "s0.json", tmp_path / "s4.json"])

    def refuse(*a, **k):
        raise AssertionError("a merged (regime, method) ran again")

    monkeypatch.setattr(sweep, "run_fidelity", refuse)
    merged = sweep.fidelity_sweep(model, ByteTokenizer(), _windows(2), regimes=(0, 4),
                                  store=store, **kw)
    for sinks in ("0", "4"):
        assert merged["regimes"][sinks]["comparisons"] == whole["regimes"][sinks]["comparisons"]
    assert merged["across"] == whole["across"]
    monkeypatch.undo()
    sweep.fidelity_sweep(model, ByteTokenizer(), _windows(3), regimes=(0,),
                         store=tmp_path / "other.json", **kw)
    with pytest.raises(SystemExit, match="other windows or settings"):
        bench.merge_stores(store, [tmp_path / "other.json"])
    with pytest.raises(SystemExit, match="no such file"):
        bench.merge_stores(store, [tmp_path / "missing.json"])


def test_deferred_output_head_gives_the_logits_of_the_plain_path(model):
    """One output projection over the collected hidden states = the logits chunk by chunk."""
    from kvbound.eval import fidelity

    ids = torch.stack([w.ids for w in _windows(2)])
    assert fidelity._head_is_plain(model)
    cache = EvictionCache(model, "trimkv", budget=8, buffer=4)
    deferred = bounded_logprobs(model, ids, cache, protocol="decode", buffer=4, keep_from=8)
    model.__dict__["_kvbound_plain_head"] = False
    try:
        cache = EvictionCache(model, "trimkv", budget=8, buffer=4)
        plain = bounded_logprobs(model, ids, cache, protocol="decode", buffer=4)
    finally:
        del model.__dict__["_kvbound_plain_head"]
    assert deferred.shape == (2, 64 - 8, plain.shape[-1])
    assert torch.allclose(deferred, plain[:, 8:], atol=1e-5)


def test_logits_changed_after_the_head_are_not_deferred():
    """Gemma-style final soft-capping happens after the projection: the check must see it."""
    from kvbound.eval import fidelity

    capped = tiny_model("gemma3", final_logit_softcapping=0.5)
    plain = tiny_model("gemma3")
    assert not fidelity._head_is_plain(capped)
    assert fidelity._head_is_plain(plain)


def test_sweep_in_groups_equals_one_group_and_resumes_per_group(model, tmp_path, monkeypatch):
    from kvbound.eval import sweep

    kw = dict(budgets=[8, 16], buffer=4, methods=["trimkv", "streaming", "knorm"],
              fewer_windows={"knorm": 3}, progress=False)
    whole = sweep.fidelity_sweep(model, ByteTokenizer(), _windows(4), batch_size=4, **kw)
    store = tmp_path / "partial.json"
    real, calls = sweep.run_fidelity, []

    def stop_after_first(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(k["methods"][0][0])
        return real(*a, **k)

    monkeypatch.setattr(sweep, "run_fidelity", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        sweep.fidelity_sweep(model, ByteTokenizer(), _windows(4), batch_size=2, store=store, **kw)
    assert calls == ["0/trimkv"]
    monkeypatch.setattr(sweep, "run_fidelity", lambda *a, **k: calls.append(
        (len(a[2]), k["methods"][0][0])) or real(*a, **k))
    grouped = sweep.fidelity_sweep(model, ByteTokenizer(), _windows(4), batch_size=2,
                                   store=store, **kw)
    # after the stop: everything but the one saved (group, regime, method), each once
    labels = [f"{s}/{m}" for s in (0, 4) for m in ("trimkv", "streaming", "knorm")]
    assert sorted(calls[1:]) == sorted([(2, x) for x in labels if x != "0/trimkv"]
                                       + [(2, x) for x in labels])
    for sinks in ("0", "4"):
        a = {(r["label"], r["budget"]): r for r in whole["regimes"][sinks]["results"]}
        b = {(r["label"], r["budget"]): r for r in grouped["regimes"][sinks]["results"]}
        assert a.keys() == b.keys()
        for key, r in a.items():
            assert b[key]["windows"] == r["windows"] == (3 if key[0] == "knorm" else 4)
            assert b[key]["source_per_window"] == r["source_per_window"]
            assert b[key]["kl_per_window"] == pytest.approx(r["kl_per_window"], rel=1e-3,
                                                            abs=1e-6)
            assert b[key]["kl_mean"] == pytest.approx(r["kl_mean"], rel=1e-3)
            assert b[key]["sinks"] == int(sinks)
        assert grouped["regimes"][sinks]["windows"] == whole["regimes"][sinks]["windows"] == 4


def test_sweep_variants_are_labelled_compared_with_heuristics_and_tied_to_their_gates(tmp_path):
    from kvbound.eval import sweep

    model = tiny_model("llama", seed=1)
    shipped = RetentionGates.for_model(model, bias_init=2.0, init_std=0.5).attach(model)
    new = RetentionGates.for_model(model, bias_init=1.0, init_std=0.5, seed=9)
    kw = dict(budgets=[8, 16], buffer=4, methods=["trimkv", "streaming", "new"], focus="new",
              store=tmp_path / "s.json", progress=False)
    res = sweep.fidelity_sweep(model, ByteTokenizer(), _windows(2),
                               variants={"new": {"method": "trimkv", "gates": new}}, **kw)
    rows = {r["label"]: r for r in res["regimes"]["0"]["results"] if r["budget"] == 8}
    assert rows["new"]["gates"] == new.ref() and rows["trimkv"]["gates"] == shipped.ref()
    assert rows["new"]["kl_per_window"] != rows["trimkv"]["kl_per_window"]
    for c in res["regimes"]["0"]["comparisons"]:
        assert c["vs_best"]["other"] == "streaming"  # another TRIM-KV variant is not "other"
    across = res["across"]
    assert (across["focus_sinks"], across["others_sinks"]) == (0, 4)
    first = across["comparisons"][0]
    assert first["kl"] == rows["new"]["kl_mean"]
    streaming4 = next(r for r in res["regimes"]["4"]["results"]
                      if r["label"] == "streaming" and r["budget"] == 8)
    assert first["vs_best"]["other_kl"] == streaming4["kl_mean"]
    other = RetentionGates.for_model(model, bias_init=3.0, seed=11)
    with pytest.raises(KVBoundError, match="other gates"):
        sweep.fidelity_sweep(model, ByteTokenizer(), _windows(2),
                             variants={"new": {"method": "trimkv", "gates": other}}, **kw)


def test_sweep_variant_with_a_policy_setting_runs_under_it():
    """A variant may set policy options (fidelity_sweep.py --set LABEL.lookahead=8): its rows run
    and record them, the plain entry keeps the defaults, both under the same rules."""
    from kvbound.eval import sweep

    model = tiny_model("llama", seed=1)
    gates = RetentionGates.for_model(model, bias_init=2.0, init_std=0.5).attach(model)
    res = sweep.fidelity_sweep(model, ByteTokenizer(), _windows(2), budgets=[8], buffer=4,
                               methods=["trimkv", "streaming", "la"], regimes=(0,), focus="la",
                               variants={"la": {"method": "trimkv", "gates": gates,
                                                "lookahead": 8}}, progress=False)
    rows = {r["label"]: r for r in res["regimes"]["0"]["results"]}
    assert rows["la"]["settings"]["policy"] == {"policy": "trimkv", "lookahead": 8}
    assert rows["trimkv"]["settings"]["policy"] == {"policy": "trimkv", "lookahead": 1}
    assert rows["la"]["gates"] == rows["trimkv"]["gates"] == gates.ref()


def test_replace_rows_swaps_one_method_and_recomputes_the_comparisons(model):
    """fidelity_sweep.py --replace: a method re-measured on the same windows takes the place of
    its published rows, every other row is kept, comparisons follow; other windows are refused."""
    from kvbound.eval import sweep

    kw = dict(budgets=[8, 16], buffer=4, progress=False, regimes=(0, 4))
    published = sweep.fidelity_sweep(model, ByteTokenizer(), _windows(2),
                                     methods=["full", "trimkv", "streaming"], **kw)
    fresh = sweep.fidelity_sweep(model, ByteTokenizer(), _windows(2),
                                 methods=["full", "trimkv"], **kw)
    for regime in fresh["regimes"].values():  # stand-in for new gates: other per-window KLs
        for r in regime["results"]:
            if r["label"] == "trimkv":
                r["kl_per_window"] = [v * 0.5 for v in r["kl_per_window"]]
                r["kl_mean"] *= 0.5
    out = sweep.replace_rows(published, fresh, "trimkv", note={"command": "c"})
    for sinks in ("0", "4"):
        rows = out["regimes"][sinks]["results"]
        assert [r["label"] for r in rows] == [r["label"]
                                              for r in published["regimes"][sinks]["results"]]
        new = {r["budget"]: r for r in fresh["regimes"][sinks]["results"]
               if r["label"] == "trimkv"}
        for r in rows:
            if r["label"] == "trimkv":
                assert r == new[r["budget"]]
            else:
                assert r in published["regimes"][sinks]["results"]
        assert out["regimes"][sinks]["comparisons"] == sweep.compare_to_best(rows, [8, 16],
                                                                              "trimkv")
        assert (out["regimes"][sinks]["comparisons"]
                != published["regimes"][sinks]["comparisons"])
    assert out["across"]["comparisons"] == sweep.compare_across(
        out["regimes"]["0"]["results"], out["regimes"]["4"]["results"], [8, 16], "trimkv")
    assert out["replaced"] == [{"method": "trimkv", "command": "c"}]
    assert "replaced" not in published  # the published run is not modified
    other = sweep.fidelity_sweep(model, ByteTokenizer(), _windows(3),
                                 methods=["full", "trimkv"], **kw)
    with pytest.raises(KVBoundError, match="not the published ones"):
        sweep.replace_rows(published, other, "trimkv", note={})
    with pytest.raises(KVBoundError, match="no 'knorm' rows"):
        sweep.replace_rows(published, fresh, "knorm", note={})
