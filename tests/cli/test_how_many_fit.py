"""benchmarks/how_many_fit.py on a tiny config: the sizes it reports are the caches' real ones."""

from __future__ import annotations

import json

import pytest

from kvbound.testing import tiny_config
from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def fit():
    return load_benchmark("how_many_fit")


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_config("llama").to_dict()))
    return str(path)


def _args(fit, config, method, *extra):
    return fit.parser().parse_args(
        ["--worker", "--method", method, "--model-config", config, "--context", "300",
         "--kv-limit-gb", str(300_000 / fit.GB), "--budget", "16", "--buffer", "4", "--chunk",
         "8", "--decode-tokens", "4", "--warmup", "1", *extra])


def test_worker_sizes_are_the_caches_real_ones(fit, config):
    full = fit.worker(_args(fit, config, "full"))
    cfg = tiny_config("llama")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
    assert full["per_row_kv_bytes"] == per_token * 300
    assert full["fits"] == 300_000 // (per_token * 300) and full["batch"] == full["fits"]
    assert full["kv_bytes"] == full["batch"] * per_token * (300 + 4)  # + the decoded tokens
    tk = fit.worker(_args(fit, config, "trimkv", "--max-batch", "7"))
    assert tk["per_row_kv_bytes"] == per_token * (16 + 4 + 8)  # budget + buffer + chunk slots
    assert tk["fits"] == 300_000 // tk["per_row_kv_bytes"] > 7
    assert tk["batch"] == 7 and tk["capped"]
    assert tk["kv_bytes"] == 7 * tk["per_row_kv_bytes"]  # repeated to the batch, still bounded
    assert tk["decode_tok_s"] > 0 and full["decode_tok_s"] > 0
    md = fit.render({"records": [full, tk], "command": "cmd", "machine": "m",
                     "args": vars(_args(fit, config, "full", "--max-batch", "7"))})
    assert "| trimkv | " in md and "7 (capped)" in md and "x |" in md


def test_whole_run_writes_json(fit, config, tmp_path):
    out = tmp_path / "fit.json"
    fit.main(["--model-config", config, "--methods", "full,streaming", "--context", "200",
              "--kv-limit-gb", str(200_000 / fit.GB), "--budget", "16", "--buffer", "4",
              "--chunk", "8", "--decode-tokens", "3", "--warmup", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert [r["method"] for r in res["records"]] == ["full", "streaming"]
    assert res["records"][1]["fits"] > res["records"][0]["fits"]
