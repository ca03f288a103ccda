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
    monkeypatch.setattr(kvbound.models, "load_model", lambda name, dtype=None, device=None: (model, ByteTokenizer()))

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


def test_worker_on_a_random_config_model_with_a_batch(tmp_path):
    """--model-config: random weights from a config.json (random tokens, random gates for
    trimkv); --batch-size rows decode together, counted in tok/s, and the KV bytes scale."""
    import json

    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
           "max_position_embeddings": 512}
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    recs = {}
    for method in ("full", "trimkv"):
        for b in (1, 2):
            args = bench.parser().parse_args(
                ["--worker", "--method", method, "--length", "96", "--budget", "16", "--buffer",
                 "4", "--chunk", "32", "--decode-tokens", "6", "--warmup", "2", "--batch-size",
                 str(b), "--model-config", str(tmp_path / "tiny.json")])
            recs[(method, b)] = bench.worker(args)
    for (_method, b), r in recs.items():
        assert r["batch_size"] == b and r["random_weights"] and len(r["step_ms"]) == 6
    assert recs[("trimkv", 2)]["peak_kv_bytes"] == 2 * recs[("trimkv", 1)]["peak_kv_bytes"]
    assert recs[("trimkv", 1)]["peak_tokens_per_head"] <= 16 + 4 + 32
    assert recs[("full", 1)]["peak_tokens_per_head"] == 96 + 6  # prompt + every decode step
    assert recs[("full", 1)]["ideal_speedup"] == 1.0
    r = recs[("trimkv", 2)]
    assert r["ideal_speedup"] == pytest.approx((r["weight_bytes"] + r["full_kv_bytes"])
                                               / (r["weight_bytes"] + r["peak_kv_bytes"]))
    assert r["ideal_speedup"] > recs[("trimkv", 1)]["ideal_speedup"] > 1  # K/V weigh more
    table = bench.render({"records": list(recs.values()), "args": vars(args)})
    assert "ideal**" in table and f"{r['ideal_speedup']:.2f}x" in table


def test_shipped_configs_build_their_architectures():
    from kvbound.models.random_config import random_model, read_config, shipped_configs

    assert {"llama-3.2-1b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b"} <= set(shipped_configs())
    cfg = read_config("qwen3-4b")
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (2560, 36, 8)
    small = random_model("llama-3.2-1b", num_hidden_layers=1, hidden_size=64,
                         intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, vocab_size=256)
    again = random_model("llama-3.2-1b", num_hidden_layers=1, hidden_size=64,
                         intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, vocab_size=256)
    assert small.config.rope_scaling["rope_type"] == "llama3"
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(),
                                                 again.state_dict().values(), strict=True))


def test_random_fill_decodes_the_same_resident_cache(tmp_path):
    """--fill random (decode speed at sizes too slow to prefill): the full cache holds the whole
    context of random K/V; a bounded cache reaches the same resident size and peak as a real
    prefill, is repeated to the batch, and its ideal ratio counts the whole context."""
    import json

    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
           "max_position_embeddings": 1024}
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))

    def run(method, fill, batch):
        return bench.worker(bench.parser().parse_args(
            ["--worker", "--method", method, "--length", "400", "--budget", "16", "--buffer", "4",
             "--chunk", "32", "--decode-tokens", "6", "--warmup", "2", "--batch-size", str(batch),
             "--model-config", str(tmp_path / "tiny.json"), "--fill", fill]))

    full = run("full", "random", 2)
    assert full["peak_tokens_per_head"] == 400 + 6 and full["prefill_tok_s"] is None
    real = run("full", "prefill", 2)
    assert full["peak_kv_bytes"] == real["peak_kv_bytes"]
    fast, slow = run("trimkv", "random", 2), run("trimkv", "prefill", 2)
    assert fast["peak_tokens_per_head"] == slow["peak_tokens_per_head"] <= 16 + 4 + 32
    assert fast["peak_kv_bytes"] == slow["peak_kv_bytes"]
    assert fast["full_kv_bytes"] == slow["full_kv_bytes"] == full["peak_kv_bytes"]  # whole context
    assert fast["ideal_speedup"] == pytest.approx(slow["ideal_speedup"])
    table = bench.render({"records": [full, fast], "args": vars(bench.parser().parse_args(
        ["--fill", "random", "--model-config", "x"]))})
    assert "| trimkv | 400 | - |" in table and "--fill random" in table
    with pytest.raises(SystemExit, match="drop '\\+compile'"):
        run("trimkv+compile", "random", 1)


def test_the_kv_cost_line_fits_the_per_token_cost_and_names_a_compute_bound_attention():
    def rec(length, ms):  # 1 GB of weights, 1 MB of K/V per cached token
        return {"length": length, "peak_tokens_per_head": length, "step_ms_mean": ms,
                "weight_bytes": 10**9, "peak_kv_bytes": length * 10**6}

    # fixed part 100 ms -> weights read at 10 GB/s -> 1K tokens' 1 GB of K/V: 100 ms
    line = bench._kv_cost_line([rec(4000, 500.0), rec(1000, 200.0)])
    assert "adds 100.0 ms" in line and "fixed part 100 ms" in line and "1.0x the 100.0 ms" in line
    assert "close to memory-bound" in line
    slow = bench._kv_cost_line([rec(1000, 1100.0), rec(4000, 4100.0)])  # 1000 ms per 1K tokens
    assert "10.0x" in slow and "compute-bound" in slow
    assert bench._kv_cost_line([rec(1000, 200.0)]) == ""
    noisy = bench._kv_cost_line([rec(1000, 300.0), rec(4000, 200.0)])  # slower at the short one
    assert noisy.endswith("(no per-token cost to fit)") and "compute-bound" not in noisy


def test_speed_from_json_re_renders_a_saved_run_and_names_both_commands(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"
    args = vars(bench.parser().parse_args(["--fill", "random", "--model-config", "x"]))
    rec = {"method": "full", "length": 400, "compiled": False, "prefill_tok_s": None,
           "decode_tok_s": 5.0, "step_ms_mean": 200.0, "peak_kv_bytes": 4 * 10**6,
           "peak_rss_mb": 100.0, "scoring_share": 0.0, "bookkeeping_share": 0.0}
    saved = tmp_path / "speed.json"
    saved.write_text(json.dumps({"records": [rec], "args": args | {"title": "Saved title"},
                                 "command": "python the-original-run", "machine": "M1"}))

    def speed(*argv):
        return subprocess.run([sys.executable, str(script), *argv], capture_output=True,
                              text=True)

    out = speed("--json", str(saved), "--from-json")
    assert out.returncode == 0, out.stderr
    assert "## Saved title" in out.stdout and "Machine: M1" in out.stdout
    assert "Command: `python the-original-run` (rendered from its JSON by `python " in out.stdout
    assert "| full | 400 | - | 5.0 |" in out.stdout
    for argv, message in ((["--from-json"], "name it with --json PATH"),
                          (["--json", str(tmp_path / "none.json"), "--from-json"],
                           "no saved run at")):
        bad = speed(*argv)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
