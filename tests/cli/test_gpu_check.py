"""benchmarks/gpu_check.py without a GPU: its plan and its report (the run itself is
`bash benchmarks/gpu_check.sh --dry-run`)."""

from __future__ import annotations

from tests.helpers import load_benchmark


def _module():
    return load_benchmark("gpu_check")


def _rec(method, length, batch, tok_s):
    return {"method": method, "length": length, "batch_size": batch, "decode_tok_s": tok_s,
            "prefill_tok_s": 1000.0, "peak_kv_bytes": 1e6, "full_kv_bytes": 4e6,
            "weight_bytes": 1e6, "ideal_speedup": 2.5, "peak_rss_mb": 10.0, "peak_gpu_mb": 20.0,
            "scoring_share": 0.0, "bookkeeping_share": 0.0, "step_ms_mean": 1000 / tok_s,
            "compiled": method.endswith("+compile"), "compile_seconds": 3.0}


def test_plan_runs_the_papers_setting_first_and_covers_the_matrix():
    g = _module()
    order = g.plan(g.REAL)
    assert order[0] == ("full", 32768, 4) and order[1] == ("trimkv", 32768, 4)
    assert len(order) == len(set(order)) == 6 * 3 * 2
    assert {m for m, _, _ in order} >= {"full+compile", "trimkv+compile", "streaming"}


def test_report_says_what_ran_what_did_not_and_the_target():
    g = _module()
    res = {"dry_run": False, "config": "qwen3-4b", "plan": g.REAL, "seconds": 400.0,
           "command": "bash benchmarks/gpu_check.sh", "machine": "GPU",
           "tests": {"rc": 0, "summary": "10 passed", "seconds": 30.0},
           "speed": [_rec("full", 32768, 4, 100.0), _rec("trimkv", 32768, 4, 300.0),
                     _rec("streaming", 32768, 4, 310.0)],
           "skipped": [["full", 4096, 1]], "fit": None}
    md = g.render(res)
    assert "### Decode speed" in md and "10 passed" in md
    assert "TRIM-KV decodes 3.00x the full cache" in md
    assert "Not run (deadline or failure): full 4096 1" in md
    assert "| peak GPU MB |" in md  # GPU memory, not host RSS, on a GPU
