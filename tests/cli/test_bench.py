"""`kvbound bench` worker and report on a tiny model (the real sweep is benchmarks/speed.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

from kvbound import bench
from kvbound.gates import RetentionGates
from kvbound.testing import ByteTokenizer, tiny_model


@pytest.fixture
def tiny(monkeypatch):
    import kvbound.generation
    import kvbound.models

    model = tiny_model("llama", seed=0)
    RetentionGates.for_model(model, bias_init=2.0, init_std=0.5, seed=0).attach(model)
    monkeypatch.setattr(kvbound.models, "load_model", lambda name, dtype=None: (model, ByteTokenizer()))

    def eager_config(device):
        cfg = CompileConfig(backend="eager", mode=None, fullgraph=False, dynamic=False)
        cfg._compile_all_devices = True
        return cfg

    monkeypatch.setattr(kvbound.generation, "compile_config", eager_config)
    yield model
    torch._dynamo.reset()


def _args(method, length):
    return bench.parser().parse_args(
        ["--worker", "--method", method, "--length", str(length), "--budget", "16", "--buffer", "4",
         "--chunk", "32", "--full-chunk", "64", "--decode-tokens", "10", "--warmup", "2"])


def test_worker_measures_every_method(tiny):
    recs = [bench.worker(_args(m, n)) for n in (64, 160)
            for m in ("full", "trimkv", "streaming", "trimkv+compile", "full+compile")]
    for r in recs:
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and len(r["step_ms"]) == 10
        assert r["compiled"] == r["method"].endswith("+compile")
    by = {(r["method"], r["length"]): r for r in recs}
    for m in ("trimkv", "streaming", "trimkv+compile"):
        assert by[(m, 64)]["peak_kv_bytes"] == by[(m, 160)]["peak_kv_bytes"]  # flat
        assert by[(m, 160)]["peak_tokens_per_head"] <= 16 + 4 + 32
    assert by[("full", 160)]["peak_kv_bytes"] > 2 * by[("full", 64)]["peak_kv_bytes"]
    assert 0 < by[("trimkv", 160)]["scoring_share"] < 1
    md = bench.render({"records": recs, "args": vars(_args("full", 64)) | {"repeats": 1}})
    assert "| trimkv+compile | 160 |" in md and "compiled in" in md
    assert "TRIM-KV step" in md


def test_median_run_is_a_real_run():
    recs = [{"decode_tok_s": x, "id": i} for i, x in enumerate([3.0, 1.0, 2.0, 5.0])]
    m = bench.median_run(recs)
    assert m["id"] == 2 and m["decode_tok_s_runs"] == [1.0, 2.0, 3.0, 5.0]
