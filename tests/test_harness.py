"""lm-evaluation-harness model type ``kvbound`` on local fixture tasks (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # the [lm-eval] extra; part of `make test`

from kvbound.gates import RetentionGates  # noqa: E402
from kvbound.models import load_model  # noqa: E402
from tests.helpers import tiny_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["kvbound_tiny_gen", "kvbound_tiny_mc"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    data = root / "data.txt"
    data.write_text((ROOT / "tests" / "fixtures" / "lm_eval" / "tiny_qa.jsonl").read_text() * 3)
    model_dir = tiny_model_dir(root / "model", data)
    model, _ = load_model(model_dir)
    RetentionGates.for_model(model, intermediate_size=8, bias_init=2.0, seed=0).save(root / "g")
    return {"model": str(model_dir), "gates": str(root / "g")}


def _evaluate(monkeypatch, model_args: str, limit=None):
    from lm_eval.tasks import TaskManager

    import kvbound.harness  # noqa: F401 - registers the model type

    monkeypatch.chdir(ROOT)  # the fixture tasks name their data relative to the repository
    return lm_eval.simple_evaluate(
        model="kvbound", model_args=model_args, tasks=TASKS, limit=limit, log_samples=True,
        task_manager=TaskManager(include_path=str(ROOT / "tests" / "fixtures" / "lm_eval"),
                                 include_defaults=False))  # indexing lm-eval's own tasks: ~10 s


def _lm(env, **kw):
    from kvbound.harness import KVBoundLM

    return KVBoundLM(pretrained=env["model"], gates=env["gates"], **kw)


def test_full_and_trimkv_run_both_request_types(env, monkeypatch):
    """Both fixture tasks (generate_until, multiple-choice loglikelihood) run for full and for
    trimkv at a budget that compresses their ~50-token prompts; the settings are recorded."""
    out = {}
    for method in ("full", "trimkv"):
        args = f"pretrained={env['model']},method={method},budget=8,buffer=2,chunk=4,sinks=1"
        if method == "trimkv":
            args += f",gates={env['gates']}"
        res = _evaluate(monkeypatch, args)
        assert set(TASKS) <= set(res["results"])
        assert len(res["samples"]["kvbound_tiny_mc"]) == 8
        out[method] = res
    info = out["trimkv"]["config"]["model_args"]
    assert "method=trimkv" in info and "budget=8" in info
    mc = [s["resps"] for s in out["full"]["samples"]["kvbound_tiny_mc"]]
    mc_b = [s["resps"] for s in out["trimkv"]["samples"]["kvbound_tiny_mc"]]
    assert mc != mc_b  # the bounded cache changed the scores


def test_bounded_scoring_is_the_decode_protocol(env):
    """loglikelihood logits = feeding the text in chunks through one bounded cache; chunk 1 =
    token-by-token decoding; a budget that holds everything = the full cache."""
    from kvbound.cache import EvictionCache

    ids = torch.randint(3, 200, (2, 30), generator=torch.Generator().manual_seed(0))
    lm = _lm(env, method="trimkv", budget=8, buffer=2, chunk=1, sinks=1)
    got = lm._model_call(ids)
    cache = EvictionCache(lm.model, "trimkv", budget=8, buffer=2, sinks=1)
    with torch.no_grad():
        want = torch.cat([lm.model(ids[:, i:i + 1], cache=cache).logits for i in range(30)], 1)
    torch.testing.assert_close(got, want)
    full = _lm(env, method="full")._model_call(ids)
    big = _lm(env, method="trimkv", budget=64, buffer=2, chunk=4)._model_call(ids)
    torch.testing.assert_close(big, full, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, full, atol=1e-3)


def test_generation_uses_a_bounded_cache(env, monkeypatch):
    from kvbound.cache import EvictionCache

    lm = _lm(env, method="h2o", budget=8, buffer=2, chunk=4)
    seen = []
    orig = lm.model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("cache"))
        return orig(*args, **kwargs)

    monkeypatch.setattr(lm.model, "generate", spy)
    ctx = torch.randint(3, 200, (1, 20), generator=torch.Generator().manual_seed(1))
    out = lm._model_generate(ctx, max_length=26, stop=["\n\n\n"], do_sample=False)
    assert out.shape[1] == 26 and isinstance(seen[0], EvictionCache)
    assert seen[0].stats().peak_tokens_per_head <= 8 + 2 + 4 and seen[0].stats().evictions > 0


def test_bad_model_args_say_what_to_do(env):
    from kvbound.errors import KVBoundError

    with pytest.raises(KVBoundError, match="Unknown method"):
        _lm(env, method="nope")
    with pytest.raises(KVBoundError, match="budget must be an integer"):
        _lm(env, method="trimkv", budget=0)


def test_kvbound_lm_eval_command_prints_a_table(env, monkeypatch, capsys):
    from kvbound.harness import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", [
        "kvbound-lm-eval", "--model", "kvbound", "--model_args",
        f"pretrained={env['model']},method=streaming,budget=8,buffer=2,chunk=4",
        "--tasks", "kvbound_tiny_mc", "--include_path", "tests/fixtures/lm_eval", "--limit", "4"])
    main()
    out = capsys.readouterr().out
    assert "kvbound_tiny_mc" in out and "acc" in out


@pytest.mark.integration
def test_embedded_model_full_and_trimkv_on_the_fixture_tasks(monkeypatch):
    """The README's offline command, on SmolLM2 with its shipped gates (2 documents per task)."""
    res = {m: _evaluate(monkeypatch, f"method={m},budget=16,buffer=4,chunk=16", limit=2)
           for m in ("full", "trimkv")}
    for r in res.values():
        assert set(TASKS) <= set(r["results"])
        assert 0.0 <= r["results"]["kvbound_tiny_mc"]["acc,none"] <= 1.0
    assert "trimkv" in res["trimkv"]["config"]["model_args"]
