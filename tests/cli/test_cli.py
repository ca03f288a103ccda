"""CLI on the embedded model (integration): JSON output of generate, bounded memory, demo."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvbound.cli import app

pytestmark = pytest.mark.integration

KEYS = {"text", "prompt_tokens", "new_tokens", "seconds", "prefill_seconds", "decode_seconds",
        "seen_tokens", "peak_tokens_per_head", "peak_kv_bytes", "full_kv_bytes", "evictions"}


def _json(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = [x for x in result.stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line)


def test_generate_json_full():
    out = _json(["generate", "--prompt", "What is the capital of France?", "--method", "full",
                 "--max-new-tokens", "8", "--json"])
    assert KEYS <= set(out)
    assert out["new_tokens"] == 8 and out["prompt_tokens"] > 5 and out["text"].strip()
    assert out["peak_tokens_per_head"] == out["prompt_tokens"] + 7


def test_generate_json_bounded_streaming():
    out = _json(["generate", "--prompt", "Count from one to fifty in words.", "--method",
                 "streaming", "--budget", "16", "--buffer", "4", "--max-new-tokens", "40",
                 "--min-new-tokens", "40", "--json"])
    assert out["peak_tokens_per_head"] <= 16 + 4 + out["prompt_tokens"]
    assert out["seen_tokens"] == out["prompt_tokens"] + 39
    assert out["evictions"] > 0 and out["peak_kv_bytes"] < out["full_kv_bytes"]
    assert out["sinks"] == 4


def test_demo_quick(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "demo.json").read_text())
    methods = {r["method"] for r in data["rows"]}
    assert {"full", "trimkv", "streaming"} <= methods
    full = next(r for r in data["rows"] if r["method"] == "full")
    assert full["kl"] == 0 and full["gen_agreement"] == 1
    for r in data["rows"]:
        if r["method"] != "full":
            assert r["peak_tokens_per_head"] <= data["budget"] + data["buffer"] + 128
            assert r["sinks"] == data["sinks"] == 4  # the same rules for every method
    assert (tmp_path / "demo_methods.png").stat().st_size > 1000
    assert (tmp_path / "demo_retention.png").stat().st_size > 1000
