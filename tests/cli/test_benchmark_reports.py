"""Reports of benchmarks whose runs are too long for the suite: rendering and decisions."""

from __future__ import annotations

from tests.helpers import load_benchmark


def _dtype_res(bf16_speed, bf16_kl, bf16_prefill=100.0):
    speed = [{"method": m, "dtype": d, "decode_tok_s": (bf16_speed if d == "bfloat16" else 10.0),
              "prefill_tok_s": (bf16_prefill if d == "bfloat16" else 100.0)} for m in ("full", "trimkv") for d in ("float32", "bfloat16")]
    ci = lambda x: {"mean": x, "lo": x, "hi": x}  # noqa: E731
    rows = {"float32 full": {"kl": ci(0.0), "top1": ci(1.0)},
            "bfloat16 full": {"kl": ci(0.001), "top1": ci(0.99)},
            "float32 trimkv": {"kl": ci(0.2), "top1": ci(0.8)},
            "bfloat16 trimkv": {"kl": ci(bf16_kl), "top1": ci(0.8)}}
    return {"speed": speed, "hardware": {"avx512_bf16": False, "amx": False, "capability": "AVX2"},
            "fidelity": {"rows": rows, "windows": 8, "seq_len": 1024, "budget": 64, "buffer": 16,
                         "sinks": 4, "sources": ["pydoc-eval-half"]},
            "args": {"length": 1024, "budget": 64, "buffer": 16, "decode_tokens": 48, "warmup": 4},
            "command": "cmd", "machine": "m"}


def test_cpu_dtype_changes_the_default_only_when_faster_at_equal_quality():
    d = load_benchmark("cpu_dtype")
    assert "should be the default" in d.verdict(_dtype_res(bf16_speed=20.0, bf16_kl=0.205))
    assert "stays float32" in d.verdict(_dtype_res(bf16_speed=5.0, bf16_kl=0.2))
    assert "more than 5%" in d.verdict(_dtype_res(bf16_speed=20.0, bf16_kl=0.3))
    slow_prompt = d.verdict(_dtype_res(bf16_speed=20.0, bf16_kl=0.2, bf16_prefill=25.0))
    assert "stays float32" in slow_prompt and "prefills at 0.25x" in slow_prompt
    md = d.render(_dtype_res(bf16_speed=5.0, bf16_kl=0.2))
    assert "| trimkv | 10.0 | 5.0 | 0.50x |" in md and "AMX no" in md


def test_sink_probe_report_counts_the_sink_layers_that_keep_token_0():
    p = load_benchmark("sink_probe")
    res = {"tokens": 1024, "attention_on_first": [0.0, 0.5, 0.4],
           "gates": {"a": {"ref": "a@1", "rank": [900, 1, 700], "one_minus_beta": [1e-2, 0, 1e-4]}},
           "command": "cmd", "machine": "m"}
    md = p.render(res)
    assert "| 1 | 0.50 | 1 / 0e+00 |" in md
    assert "token 0 within the top 32 in 1 of the 2 layers" in md


def test_past_context_report_shows_the_full_cache_generation_beside_trimkv():
    """past_context.py part 2 with the full cache (up to the context) beside TRIM-KV's two position
    modes: one column per mode, blocks a mode did not reach marked, the full cache summarised
    inside the context only."""
    p = load_benchmark("past_context")
    gen = lambda ppl, rep: {"ppl": ppl, "repeated_4grams": rep, "new_tokens": 1024 * len(ppl),  # noqa: E731
                            "decode_tok_s": 5.0, "peak_tokens_per_head": 272}
    res = {"block": 1024, "budget": 256, "context": 2048, "lookback": 2048,
           "repetition_penalty": 1.1, "part1": {"tokens": 2048, "full": [8.0, 9.0]},
           "part2": {"full": gen([4.0, 2.0], [0.1, 0.5]),
                     "absolute": gen([4.5, 2.5, 30.0], [0.1, 0.4, 0.2]),
                     "rolling": gen([4.4, 2.4, 1.0], [0.1, 0.4, 1.0])}}
    md = p._table(res)
    assert ("| block (generated tokens) | ppl full cache | ppl trimkv/absolute | ppl trimkv/rolling"
            " | repeated 4-grams full cache |") in md
    assert "| 2048-3072 | - | 30.00 | 1.00 | - | 0.200 | 1.000 |" in md
    assert "full cache: mean block perplexity 3.00 inside the context, repeated 4-grams 0.30;" in md
    assert "trimkv/absolute: mean block perplexity 3.50 inside the context vs 30.00 past it" in md


def test_ship_gates_plots_the_curves_of_either_objective(tmp_path):
    """ship_gates.py's loss curve: distillation logs (kl, ntp, cap) and attention-rank logs (kl,
    rank, cap; no ntp) both plot."""
    s = load_benchmark("ship_gates")
    distill = [{"step": i, "kl": 1.0 / (i + 1), "ntp": 2.0, "cap": 0.1} for i in range(3)]
    rank = [{"step": i, "kl": 2.0 / (i + 1), "rank": 4.0, "cap": 0.1} for i in range(3)]
    for name, log in (("d.png", distill), ("r.png", rank)):
        s.plot(log, tmp_path / name)
        assert (tmp_path / name).stat().st_size > 1000


def _row(label, method, budget, kls):
    return {"label": label, "method": method, "budget": budget, "kl_mean": sum(kls) / len(kls),
            "kl_per_window": kls}


def test_fidelity_sweep_pairs_each_variant_with_its_base():
    """Scope entries (METHOD@SCOPE) against the same method with per-head budgets; other variants
    of the focus's method (new gates) against the focus; plain baselines are not variants."""
    f = load_benchmark("fidelity_sweep")
    rows = [_row("trimkv", "trimkv", 32, [0.3, 0.4, 0.5]),
            _row("trimkv@global", "trimkv", 32, [0.2, 0.3, 0.6]),
            _row("rank", "trimkv", 32, [0.3, 0.4, 0.2]),
            _row("tova", "tova", 32, [0.1, 0.1, 0.1]),
            _row("tova@layer", "tova", 32, [0.2, 0.1, 0.1])]
    out = f._variant_rows({"regimes": {"0": {"results": rows}}, "budgets": [32]}, "trimkv")
    assert len(out) == 3
    assert out[0].startswith("| 0 | trimkv@global | trimkv | 32 | 0.3667 | -0.0333")
    assert out[0].endswith("| 2/3 |")  # two windows closer, one farther
    assert out[1].startswith("| 0 | rank | trimkv | 32 | 0.3000 | -0.1000")
    assert out[2].startswith("| 0 | tova@layer | tova | 32 | 0.1333 | +0.0333")
    assert out[2].endswith("| 0/3 |")


def test_fidelity_sweep_tune_text_reads_only_training_text(tmp_path, monkeypatch, capsys):
    """--tune-text: the windows come from the given files (or 'prose', the training prose) and
    never from the held-out domains; publishing from a tuning run is refused."""
    import sys

    import pytest

    from kvbound.train.data import prose_documents

    f = load_benchmark("fidelity_sweep")
    text = tmp_path / "train.txt"
    text.write_text("training words " * 50)
    texts = f.domain_texts(None, None, 1024, tune_text=[str(text), "prose"])
    assert [n for n, _ in texts] == ["tune/0", "tune/1"]
    assert texts[0][1] == text.read_text() and texts[1][1] == "\n\n".join(prose_documents())
    monkeypatch.setattr(sys, "argv", ["fidelity_sweep.py", "--tune-text", "prose",
                                      "--write-results"])
    def no_model(*_):
        raise AssertionError("a tuning run that publishes must stop before loading a model")

    monkeypatch.setattr(f, "load_model", no_model)
    with pytest.raises(SystemExit) as stop:
        f.main()
    assert stop.value.code == 2 and "for tuning only" in capsys.readouterr().err


def test_oracle_headroom_summary_pairs_windows_and_reads_goal_2():
    o = load_benchmark("oracle_headroom")
    base = [_row("trimkv", "trimkv", 32, [0.30, 0.32]), _row("tova", "tova", 32, [0.33, 0.35]),
            _row("tova", "tova", 64, [0.20, 0.22]), _row("trimkv", "trimkv", 64, [0.17, 0.18]),
            _row("knorm", "knorm", 64, [0.01])]  # fewer windows: never the best baseline
    sweep = {"regimes": {"0": {"results": base}}}
    oracle = {"regimes": {"0": [{**_row("oracle", "oracle", 32, [0.15, 0.17]),
                                 "settings": {"policy": {"policy": "oracle"}}}]}}
    (row,) = o.summarize(oracle, sweep)
    assert row["best"] == "tova" and row["best_2m"] == "tova"
    assert abs(row["best_2m_kl"] - 0.21) < 1e-9
    assert abs(row["vs_best_2m"]["mean"] - (0.16 - 0.21)) < 1e-9 and row["vs_best_2m"]["wins"] == 2
    assert abs(row["closed"] - (0.34 - 0.31) / (0.34 - 0.16)) < 1e-9
    assert "below it" in o._reading([row])


def test_oracle_headroom_on_fewer_windows_compares_on_the_sweeps_first_ones():
    """``--windows N``: the sweep's rows are cut to their first N windows, so the best baseline
    and the paired differences are those of the windows the oracle saw."""
    o = load_benchmark("oracle_headroom")
    base = [_row("trimkv", "trimkv", 32, [0.30, 0.50]), _row("tova", "tova", 64, [0.20, 0.10]),
            _row("h2o", "h2o", 64, [0.18, 0.40]), _row("snapkv", "snapkv", 32, [0.40, 0.40])]
    sweep = {"regimes": {"0": {"results": base}}}
    oracle = {"regimes": {"0": [{**_row("fit-256", "oracle", 32, [0.16]),
                                 "settings": {"policy": {"policy": "oracle"}}}]}}
    (row,) = o.summarize(oracle, sweep)
    # on all windows TOVA is the best at 64 (0.15 vs 0.29); on the first, H2O (0.18 vs 0.20)
    assert row["best_2m"] == "h2o" and abs(row["best_2m_kl"] - 0.18) < 1e-9
    assert abs(row["trimkv"] - 0.30) < 1e-9 and row["vs_best_2m"]["n"] == 1


def test_oracle_headroom_refuses_fewer_than_one_window(monkeypatch):
    import sys

    import pytest

    o = load_benchmark("oracle_headroom")
    monkeypatch.setattr(sys, "argv", ["oracle_headroom.py", "--windows", "0"])
    with pytest.raises(SystemExit, match="--windows must be at least 1"):
        o.main()


def test_oracle_headroom_write_doc_puts_merged_runs_between_the_training_doc_markers(
        tmp_path, monkeypatch):
    """``--merge ... --write-doc``: the table of saved (fitted, fewer-window) runs goes into
    docs/TRAINING.md's block, without its RESULTS heading, and RESULTS is left alone."""
    import json
    import sys

    import pytest

    o = load_benchmark("oracle_headroom")
    base = [_row("trimkv", "trimkv", 32, [0.30, 0.50]), _row("tova", "tova", 32, [0.40, 0.30]),
            _row("tova", "tova", 64, [0.20, 0.10])]
    sweep, doc = tmp_path / "sweep.json", tmp_path / "TRAINING.md"
    sweep.write_text(json.dumps({"regimes": {"0": {"results": base}}}))
    doc.write_text("intro\n<!-- BEGIN fitted-ceiling -->\nold\n<!-- END fitted-ceiling -->\nend\n")
    fit = {**_row("fit-256-seq32", "oracle", 32, [0.16]),
           "settings": {"policy": {"policy": "oracle-fit", "steps": 300}}}
    run = tmp_path / "fit.json"
    run.write_text(json.dumps({"regimes": {"0": [fit]}, "seconds": 5, "buffer": 16,
                               "budgets": [32], "command": "python oracle_headroom.py ..."}))
    monkeypatch.setattr(o, "SWEEP", sweep)
    monkeypatch.setattr(o, "DOC", doc)
    monkeypatch.setattr(o, "write_section", lambda *_: pytest.fail("RESULTS must not change"))
    monkeypatch.setattr(sys, "argv", ["oracle_headroom.py", "--merge", str(run), "--json",
                                      str(tmp_path / "merged.json"), "--write-doc"])
    o.main()
    text = doc.read_text()
    assert text.startswith("intro\n<!-- BEGIN fitted-ceiling -->\nCommand: `python")
    assert "| 0 | fit-256-seq32 | 32 | 0.1600" in text and "old" not in text
    assert "## Headroom" not in text and text.endswith("<!-- END fitted-ceiling -->\nend\n")


def test_task_sweep_pairs_trimkv_with_the_best_other_method_example_by_example(tmp_path):
    """The task sweep's paired table: TRIM-KV (chunked) against the best other method of either
    prefill mode, on the same examples, with the examples only one of them gets right."""
    import csv
    import json

    from kvbound.eval.runner import EvalConfig, load_examples
    from kvbound.eval.tasks import get_task
    from kvbound.testing import ByteTokenizer

    t = load_benchmark("task_sweep")
    tok = ByteTokenizer()
    cfg = EvalConfig(tasks=["syn_needle"], methods=["trimkv", "tova"], budgets=[32], limit=6,
                     context_tokens=200)
    examples = load_examples(get_task("syn_needle"), cfg, tok)
    right = {"trimkv": [1, 1, 1, 0, 0, 1], "tova": [1, 0, 0, 1, 0, 0], "snapkv": [1, 1, 0, 1, 0, 0]}

    def run(out, method, prefill):
        d = out / f"{method}_{prefill}"
        d.mkdir(parents=True)
        with (d / "predictions.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "task", "question", "answer", "predicted_answer"])
            for ex, ok in zip(examples, right[method], strict=False):
                w.writerow([ex.id, ex.task, "", json.dumps(ex.answer),
                            ex.answers[0] if ok else "no idea"])
        score = 100.0 * sum(right[method]) / len(examples)
        return {"task": "syn_needle", "method": method, "budget": 32, "dir": d.name,
                "prefill": prefill, "metrics": {"score": score}}

    chunked, full = tmp_path / "c", tmp_path / "f"
    runs = [({"results": [run(chunked, "trimkv", "chunked"), run(chunked, "tova", "chunked")]},
             chunked), ({"results": [run(full, "snapkv", "full")]}, full)]
    rows = t.paired_rows(runs, cfg, tok, "trimkv")
    lines = t.paired_table(rows, "trimkv")
    assert len(lines) == 3
    # snapkv with the question in its window (50.0) is the best other; trimkv 66.7: two
    # examples only trimkv gets right (2, 5), one only snapkv (3)
    assert lines[2].startswith("| syn_needle | 32 | 66.7 | snapkv (full prefill) | 50.0 | +16.7 [")
    assert lines[2].endswith("| 2 / 1 |")
    lo, hi = rows[0]["ci"]
    assert lo < 0 < hi and t.verdict(rows, "trimkv") == (
        "trimkv ahead (CI above 0): none; behind (CI below 0): none; level (CI spans 0): "
        "syn_needle M=32")


def test_scope_sweep_pairs_each_scope_with_the_published_per_head_rows():
    """Scoped rows pair window by window with the same method's per-head rows of the published
    sweep (only on the same windows); TRIM-KV's scopes also meet the best per-head baseline
    scored on every window, at M and 2M."""
    import pytest

    from kvbound.errors import KVBoundError

    s = load_benchmark("scope_sweep")

    def row(label, method, budget, kls, nll=(2.0, 3.0, 4.0)):
        return {**_row(label, method, budget, kls), "windows": len(kls),
                "nll_full_per_window": list(nll), "kl_ci": [0.0, 1.0]}

    head = {"regimes": {"0": {"results": [
        row("full", "full", 32, [0, 0, 0]), row("trimkv", "trimkv", 32, [0.3, 0.4, 0.5]),
        row("tova", "tova", 32, [0.4, 0.4, 0.4]), row("tova", "tova", 64, [0.2, 0.3, 0.2]),
        row("knorm", "knorm", 64, [0.01])]}}}  # fewer windows: never the best baseline
    res = {"regimes": {"0": {"results": [
        row("full", "full", 32, [0, 0, 0]), row("trimkv@layer", "trimkv", 32, [0.2, 0.4, 0.6]),
        row("tova@global", "tova", 32, [0.5, 0.5, 0.3])]}}}
    rows = s.paired_rows(res, head)
    assert [(r["method"], r["scope"]) for r in rows] == [("trimkv", "layer"), ("tova", "global")]
    t, v = rows
    assert abs(t["vs_head"]["mean"]) < 1e-12 and t["vs_head"]["wins"] == 1
    assert t["vs_best"]["other"] == "tova" and t["vs_best_at_2m"]["other"] == "tova"
    assert abs(t["vs_best_at_2m"]["mean"] - (0.4 - 0.7 / 3)) < 1e-9
    assert abs(v["vs_head"]["mean"] - (1.3 / 3 - 0.4)) < 1e-9 and "vs_best" not in v
    md = s.render({"command": "c", "machine": "m"}, rows, "docs/data/fidelity_sweep.json")
    assert "| 0 | trimkv | layer | 32 | 0.4000 [0.0000, 1.0000] | 0.4000 | +0.0000" in md
    other = {"regimes": {"0": {"results": [row("full", "full", 32, [0, 0, 0], nll=(2, 3, 5)),
                                           *head["regimes"]["0"]["results"][1:]]}}}
    with pytest.raises(KVBoundError, match="other windows"):
        s.paired_rows(res, other)


def test_paired_rows_join_a_candidate_run_with_the_sweep_and_the_scope_store(tmp_path):
    """A candidate's own run pairs with the published sweep's rows and the scope store's groups
    (concatenated in group order), refusing rows that scored other windows."""
    import json

    import pytest

    from kvbound.errors import KVBoundError

    p = load_benchmark("paired_rows")

    def row(label, budget, kls, nll, src="a"):
        return {"label": label, "budget": budget, "kl_per_window": kls,
                "nll_full_per_window": nll, "source_per_window": [src] * len(kls)}

    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"regimes": {"0": {"results": [
        row("trimkv", 32, [0.4, 0.5, 0.6, 0.7], [1, 2, 3, 4]),
        row("tova", 64, [0.1, 0.2, 0.3, 0.4], [5, 6, 7, 8])]}}}))
    store = tmp_path / "store.json"  # groups of two windows, written out of order
    store.write_text(json.dumps({"done": {
        "group/1/0/trimkv@global": {"results": [row("trimkv@global", 32, [0.9, 0.8], [3, 4])]},
        "group/0/0/trimkv@global": {"results": [row("trimkv@global", 32, [0.7, 0.6], [1, 2])]},
        "group/0/4/trimkv@global": {"results": [row("trimkv@global", 32, [9, 9], [1, 2])]}}}))
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"regimes": {"0": {"results": [
        row("full", 32, [0, 0, 0, 0], [1, 2, 3, 4]),
        row("cand", 32, [0.3, 0.6, 0.5, 0.5], [1, 2, 3, 4]),
        row("odd", 32, [0.3, 0.6, 0.5, 0.5], [1, 2, 3, 9]),
        row("elsewhere", 64, [0.3, 0.6, 0.5, 0.5], [5, 6, 7, 8], src="b")]}}}))
    rows = p.load_rows("0", sweep, [store], [run])
    assert rows[("trimkv@global", 32)]["kl_per_window"] == [0.7, 0.6, 0.9, 0.8]
    d = p.pair(rows, ("cand", 32), ("trimkv", 32))
    assert abs(d["mean"] + 0.075) < 1e-9 and d["wins"] == 3 and d["n"] == 4
    assert abs(d["a"] - 0.475) < 1e-9 and abs(d["b"] - 0.55) < 1e-9
    d = p.pair(rows, ("cand", 32), ("trimkv@global", 32))
    assert abs(d["mean"] + 0.275) < 1e-9 and (d["wins"], d["ties"]) == (3, 1)
    d = p.pair(rows, ("cand", 32), ("tova", 64))  # across budgets: sources must agree
    assert abs(d["mean"] - 0.225) < 1e-9 and d["wins"] == 0
    with pytest.raises(KVBoundError, match="full-cache NLL differs"):
        p.pair(rows, ("odd", 32), ("trimkv", 32))
    with pytest.raises(KVBoundError, match="other sources"):
        p.pair(rows, ("elsewhere", 64), ("tova", 64))
    with pytest.raises(KVBoundError, match="no row gone:32"):
        p.pair(rows, ("gone", 32), ("tova", 64))


def test_training_runs_table_takes_per_head_rows_only(tmp_path, monkeypatch):
    """A candidate's sweep may hold its gates with a shared budget too (same digest): the
    table's per-head columns must not take those rows."""
    import json

    t = load_benchmark("training_runs")
    monkeypatch.setattr(t, "PARTIAL", tmp_path / "none.json")
    run = tmp_path / "run.json"

    def row(scope, kl):
        return {"gates": "m@cand", "budget": 32, "kl_mean": kl, "windows": 32,
                "settings": {"budget_scope": scope}}

    run.write_text(json.dumps({"regimes": {"0": {"results": [
        row("head", 0.3), row("layer", 0.2), row("global", 0.1)]}}}))
    assert t._sweep_rows("m@cand", (run,)) == {"0": {"32": [0.3, 32]}}


def test_lost_attention_share_of_a_top_m_cut_and_its_table():
    """lost_share: the future attention on the keys a top-M cut by the score drops, only at
    decisions with more than M candidates; the oracle (scores = the attention) loses least."""
    import torch

    la = load_benchmark("lost_attention")
    # one row, one head, decision times 0, 2, 4 (stride 2) over 4 keys
    table = torch.tensor([[[[0.0, 0.0, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0],
                            [0.1, 0.2, 0.3, 0.4]]]])
    assert float(la.lost_share(table, table, 1, 2, 0)) == 0.5 * (0.4 + 0.6)  # t=2: 0.4, t=4: .6
    score = torch.tensor([[[[0.0] * 4, [0.0, 1.0, 0.0, 0.0], [4.0, 3.0, 2.0, 1.0]]]])
    lost = float(la.lost_share(table, score, 2, 2, 0))  # only t=4 has > 2 candidates
    assert abs(lost - (0.3 + 0.4) / 1.0) < 1e-6
    assert float(la.lost_share(table, table, 2, 2, 0)) < lost
    rows = [{"scorer": s, "budget": 32, "lost": v, "lost_per_window": [v, v]}
            for s, v in (("oracle", 0.09), ("v4", 0.11))]
    md = la.render({"rows": rows, "command": "cmd", "windows": ["a", "b"], "horizon": 256,
                    "fit_steps": 200})
    assert "| v4 | 0.1100 [0.1100, 0.1100] | +0.0200 |" in md
