"""Every command and option doing its job, on a tiny model saved to a directory (``--model DIR``).

The embedded model's own CLI runs are in test_cli.py (integration); these are fast.
"""

from __future__ import annotations

import json

import pytest

from kvbound.cli import main
from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGates
from kvbound.io import read_versioned
from kvbound.models import load_model
from tests.helpers import tiny_model_dir

TEXT = ("The lighthouse keeper climbed the stairs every evening. The lamp was old, the glass "
        "was clean, and ships passed safely through the narrow channel below. ") * 12


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "data.txt"
    data.write_text(TEXT)
    model_dir = tiny_model_dir(root / "model", data)
    model, _ = load_model(model_dir)
    gates_dir = root / "gates"
    RetentionGates.for_model(model, intermediate_size=8, bias_init=2.0, seed=0).save(gates_dir)
    prompt = root / "prompt.txt"
    prompt.write_text(TEXT[:300])
    return {"root": root, "model": str(model_dir), "gates": str(gates_dir), "data": str(data),
            "prompt": str(prompt)}


def _run(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    return out.out


def _gen(capsys, env, *extra) -> dict:
    # float32 unless a test asks otherwise: results are compared with the Python API's (float32)
    dtype = () if "--dtype" in extra else ("--dtype", "float32")
    out = _run(capsys, "generate", "--model", env["model"], "--gates", env["gates"],
               "--prompt-file", env["prompt"], "--max-new-tokens", 12, "--min-new-tokens", 12,
               "--json", *dtype, *extra)
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("native", [True, False])
def test_generate_dtype_auto_is_bf16_only_where_native(env, capsys, monkeypatch, native):
    """`--dtype auto` (the default) loads bf16 where the hardware computes it natively (measured
    faster at equal fidelity, docs/RESULTS.md "bf16 vs fp32 on CPU"), float32 elsewhere."""
    import torch

    import kvbound.models
    from kvbound.models import dtype as dtypes

    loaded = []
    real = kvbound.models.load_model

    def spy(name, dtype=torch.float32, **kw):
        loaded.append(dtype)
        return real(name, dtype=dtype, **kw)

    monkeypatch.setattr(kvbound.models, "load_model", spy)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert dtypes.native_bf16("cpu") is native
    out = _gen(capsys, env, "--method", "trimkv", "--budget", 16, "--buffer", 4, "--no-chat",
               "--dtype", "auto")
    assert out["new_tokens"] == 12
    _gen(capsys, env, "--method", "full", "--no-chat", "--dtype", "float16")
    assert loaded == [torch.bfloat16 if native else torch.float32, torch.float16]
    with pytest.raises(KVBoundError, match="Unknown dtype 'int8'"):
        dtypes.resolve_dtype("int8")


def test_generate_options_reach_the_cache(env, capsys):
    base = _gen(capsys, env, "--method", "trimkv", "--budget", 16, "--buffer", 4, "--chunk", 8,
                "--sinks", 2, "--no-chat")
    assert base["method"] == "trimkv" and base["budget"] == 16 and base["buffer"] == 4
    assert base["sinks"] == 2 and base["chunk"] == 8 and base["new_tokens"] == 12
    assert base["peak_tokens_per_head"] <= 16 + 4 + 8 and base["evictions"] > 0
    assert base["gates"].endswith(RetentionGates.load(env["gates"]).digest())
    full_prefill = _gen(capsys, env, "--method", "trimkv", "--budget", 16, "--buffer", 4,
                        "--full-prefill", "--no-chat")
    assert full_prefill["chunk"] is None
    assert full_prefill["peak_tokens_per_head"] == full_prefill["prompt_tokens"]


def test_generate_sampling_is_seeded(env, capsys):
    args = ("--method", "streaming", "--budget", 16, "--buffer", 4, "--sample",
            "--temperature", 1.5, "--top-p", 0.95, "--no-chat")
    a = _gen(capsys, env, *args, "--seed", 1)
    b = _gen(capsys, env, *args, "--seed", 1)
    c = _gen(capsys, env, *args, "--seed", 2)
    greedy = _gen(capsys, env, "--method", "streaming", "--budget", 16, "--buffer", 4,
                  "--no-chat")
    assert a["text"] == b["text"]
    assert c["text"] != a["text"] or greedy["text"] != a["text"]


def test_generate_repetition_penalty_discourages_repeats(env, capsys):
    from kvbound.generation import generate

    model, tok = load_model(env["model"])
    kw = dict(method="trimkv", gates=env["gates"], budget=16, buffer=4, max_new_tokens=24,
              min_new_tokens=24, chat=False)
    plain = generate(model, tok, TEXT[:300], **kw)
    penalized = generate(model, tok, TEXT[:300], repetition_penalty=50.0, **kw)
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))
    cli = _gen(capsys, env, "--method", "trimkv", "--budget", 16, "--buffer", 4, "--no-chat",
               "--max-new-tokens", 24, "--min-new-tokens", 24, "--repetition-penalty", 50)
    assert cli["text"] == penalized.text


def test_generate_compile_matches_eager(env, capsys, monkeypatch):
    """--compile decodes through torch.compile. Dynamo's eager backend keeps the arithmetic, so
    the text must match exactly; inductor's generated kernels round differently per CPU (on a
    tiny random model with near-tied logits the text then differs under ATEN_CPU_CAPABILITY=avx2),
    which is torch's numerics, not a guarantee of the library."""
    import torch._dynamo
    from transformers import CompileConfig

    from kvbound import generation

    def eager_backend(device):
        cfg = CompileConfig(backend="eager", mode=None, fullgraph=False, dynamic=False)
        cfg._compile_all_devices = True  # transformers compiles on accelerators only by default
        return cfg

    args = ("--method", "streaming", "--budget", 16, "--buffer", 4, "--no-chat")
    eager = _gen(capsys, env, *args)
    monkeypatch.setattr(generation, "compile_config", eager_backend)
    torch._dynamo.reset()
    compiled = _gen(capsys, env, *args, "--compile")
    torch._dynamo.reset()
    assert compiled["compiled"] and not eager["compiled"]
    assert compiled["text"] == eager["text"] and compiled["new_tokens"] == 12


def test_eval_fidelity_writes_results_with_the_settings_used(env, capsys):
    out = env["root"] / "fid.json"
    _run(capsys, "eval", "fidelity", "--model", env["model"], "--gates", env["gates"],
         "--text-file", env["data"], "--methods", "full,trimkv,streaming", "--budgets", "16",
         "--buffer", 4, "--sinks", 1, "--seq-len", 64, "--max-windows", 2, "--json", out,
         "--quiet")
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["results"]}
    assert rows["full"]["kl_mean"] == 0
    assert {rows["trimkv"]["sinks"], rows["streaming"]["sinks"]} == {1}
    assert rows["trimkv"]["kl_mean"] > 0 and result["windows"] == 2
    lo, hi = rows["trimkv"]["kl_ci"]
    assert lo <= rows["trimkv"]["kl_mean"] <= hi and len(rows["trimkv"]["kl_per_window"]) == 2


def test_budget_scopes_from_the_cli(env, capsys):
    """--budget-scope in generate, --budget-scopes in eval fidelity (a row per scope)."""
    head = _gen(capsys, env, "--method", "trimkv", "--budget", 8, "--buffer", 4, "--no-chat")
    pooled = _gen(capsys, env, "--method", "trimkv", "--budget", 8, "--buffer", 4, "--no-chat",
                  "--budget-scope", "global", "--min-per-head", 2)
    assert pooled["new_tokens"] == head["new_tokens"] == 12
    out = env["root"] / "fid_scopes.json"
    _run(capsys, "eval", "fidelity", "--model", env["model"], "--gates", env["gates"],
         "--text-file", env["data"], "--methods", "full,trimkv", "--budgets", "16",
         "--buffer", 4, "--seq-len", 64, "--max-windows", 1, "--budget-scopes",
         "head,layer,global", "--json", out, "--quiet")
    rows = {r["label"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"full", "trimkv", "trimkv@layer", "trimkv@global"}
    for label, scope in (("trimkv", "head"), ("trimkv@layer", "layer"),
                         ("trimkv@global", "global")):
        assert rows[label]["settings"]["budget_scope"] == scope
        assert rows[label]["settings"]["layer_budget_total"] == rows["trimkv"]["settings"][
            "layer_budget_total"]
    code = main(["eval", "fidelity", "--model", env["model"], "--text-file", env["data"],
                 "--methods", "rkv", "--budget-scopes", "global", "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "supports trimkv" in err and "Traceback" not in err


def test_eval_tasks_list_and_models(env, capsys):
    listing = _run(capsys, "eval", "list")
    assert "syn_needle" in listing and "gsm8k" in listing
    assert "smollm2-135m" in _run(capsys, "models")
    out = env["root"] / "tasks"
    _run(capsys, "eval", "tasks", "--model", env["model"], "--gates", env["gates"], "--tasks",
         "syn_needle", "--methods", "full,trimkv", "--budgets", "32", "--limit", 2,
         "--context-tokens", 64, "--buffer", 4, "--chunk", 16, "--prefill", "full",
         "--out", out, "--quiet")
    summary = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in summary["results"]} == {"full", "trimkv"}
    trim = next(r for r in summary["results"] if r["method"] == "trimkv")
    assert trim["settings"]["sinks"] == 4 and trim["settings"]["budget"] == 32  # what ran
    assert trim["prefill"] == "full" and trim["settings"]["gates"].endswith(
        RetentionGates.load(env["gates"]).digest())
    import yaml

    config = yaml.safe_load((out / trim["dir"] / "config.yaml").read_text())
    assert config["sinks"] == 4 and config["n"] == 2
    m = trim["metrics"]
    assert m["n"] == 2 and m["ci95"][0] <= m["score"] <= m["ci95"][1]
    assert "too few for a claim" in (out / "results.md").read_text()


def test_viz_writes_its_pictures(env, capsys):
    out = env["root"] / "viz"
    listed = _run(capsys, "viz", "--model", env["model"], "--gates", env["gates"],
                  "--prompt-file", env["prompt"], "--out", out, "--budget", 16, "--buffer", 4,
                  "--heads", "0:0,1:1", "--html-head", "1:0")
    for name in ("half_life.png", "timeline_L0_H0.png", "timeline_L1_H1.png", "retention.html",
                 "head_roles.json"):
        assert (out / name).stat().st_size > 0 and name in listed


def test_train_options_and_single_process_resume(env, capsys):
    out = env["root"] / "train"
    args = ("train", "--model", env["model"], "--out", out, "--data", f"file:{env['data']}",
            "--seq-len", 32, "--memory-size", 8, "--intermediate-size", 8, "--warmup-steps", 1,
            "--save-every", 1, "--cap-variant", "official", "--quality-reduction", "mean",
            "--train-sinks", 0, "--grad-checkpointing", "--no-bf16", "--quiet")
    _run(capsys, *args, "--steps", 2)
    first = RetentionGates.load(out)
    cfg = first.metadata.training["config"]
    assert (cfg["cap_variant"], cfg["quality_reduction"], cfg["train_sinks"]) == \
        ("official", "mean", 0)
    assert cfg["grad_checkpointing"] and not cfg["bf16"]
    _run(capsys, *args, "--steps", 3, "--resume")
    resumed = RetentionGates.load(out)
    assert resumed.metadata.training["steps_done"] == 3
    assert read_versioned(out, "checkpoint").name == "checkpoint.000003"
    rank = env["root"] / "train_rank"
    _run(capsys, "train", "--model", env["model"], "--out", rank, "--data",
         f"file:{env['data']}", "--seq-len", 32, "--memory-size", 8, "--intermediate-size", 8,
         "--objective", "attention-rank", "--rank-horizon", 8, "--rank-stride", 4,
         "--rank-scope", "layer", "--steps", 1, "--no-bf16", "--quiet")
    cfg = RetentionGates.load(rank).metadata.training["config"]
    assert (cfg["objective"], cfg["rank_horizon"], cfg["rank_stride"], cfg["rank_scope"]) == \
        ("attention-rank", 8, 4, "layer")


def test_bench_runs_each_method_in_its_own_process(env, capsys):
    out = env["root"] / "bench.json"
    _run(capsys, "bench", "--model", env["model"], "--gates", env["gates"], "--methods",
         "full,trimkv,trimkv@global", "--lengths", "48", "--budget", 16, "--buffer", 4,
         "--chunk", 16, "--decode-tokens", 6, "--json", out)
    recs = json.loads(out.read_text())["records"]
    assert {r["method"] for r in recs} == {"full", "trimkv", "trimkv@global"}
    trim = next(r for r in recs if r["method"] == "trimkv")
    assert trim["peak_tokens_per_head"] <= 16 + 4 + 16
    assert trim["settings"]["sinks"] == 4 and trim["settings"]["buffer"] == 4
    assert trim["gates"].endswith(RetentionGates.load(env["gates"]).digest())
    pooled = next(r for r in recs if r["method"] == "trimkv@global")
    assert pooled["budget_scope"] == pooled["settings"]["budget_scope"] == "global"
    assert pooled["allocated_kv_bytes"] > 0 and pooled["peak_kv_bytes"] > 0
    from kvbound.bench import render

    md = render(json.loads(out.read_text()), image=None)
    (line,) = [x for x in md.splitlines() if x.startswith("- L=48: trimkv@global step")]
    want = (f"vs trimkv (per head) {trim['step_ms_mean']:.1f} ms "
            f"({100 * (pooled['step_ms_mean'] / trim['step_ms_mean'] - 1):+.1f}%); peak KV "
            f"{pooled['peak_kv_bytes'] / 1e6:.2f} vs {trim['peak_kv_bytes'] / 1e6:.2f} MB")
    assert want in line


@pytest.fixture(scope="module")
def chat_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    data = root / "data.txt"
    data.write_text(TEXT)
    return {"root": root, "model": str(tiny_model_dir(root / "model", data, chat=True))}


def test_train_on_selfgen_jsonl_and_local_hf_data(chat_env, capsys, tmp_path):
    datasets = pytest.importorskip("datasets")  # a dev dependency: present in `make test`
    records = [{"messages": [{"role": "user", "content": f"Which lamp is number {i}?"},
                             {"role": "assistant", "content": f"Lamp {i} is the red one."}]}
               for i in range(4)]
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hfdata"))
    out = tmp_path / "run"
    _run(capsys, "train", "--model", chat_env["model"], "--out", out,
         "--data", f"selfgen:1:1,file:{jsonl}:1,hf:{tmp_path / 'hfdata'}:train:1",
         "--seq-len", 32, "--memory-size", 8, "--intermediate-size", 8, "--warmup-steps", 1,
         "--steps", 2, "--batch-size", 4, "--no-bf16", "--quiet")
    cached = [json.loads(x) for x in (out / "selfgen.jsonl").read_text().splitlines()]
    assert len(cached) == 1 and cached[0]["text"].strip()
    training = RetentionGates.load(out).metadata.training
    assert training["steps_done"] == 2
    assert training["config"]["data"].startswith("selfgen:1:1,file:")


def test_eval_reads_local_task_data_and_self_generated_text(chat_env, capsys, tmp_path):
    from pathlib import Path

    fixture = Path(__file__).parents[1] / "eval" / "fixtures" / "benchmarks" / "gsm8k.jsonl"
    out = tmp_path / "tasks"
    _run(capsys, "eval", "tasks", "--model", chat_env["model"], "--tasks", "gsm8k",
         "--data", f"gsm8k={fixture}", "--methods", "full,streaming", "--budgets", "16",
         "--limit", 2, "--buffer", 4, "--chunk", 8, "--out", out, "--quiet")
    rows = json.loads((out / "results.json").read_text())["results"]
    assert {(r["task"], r["method"], r["metrics"]["n"]) for r in rows} == \
        {("gsm8k", "full", 2), ("gsm8k", "streaming", 2)}
    import csv

    questions = [json.loads(x)["question"] for x in fixture.read_text().splitlines()]
    with (out / rows[0]["dir"] / "predictions.csv").open() as fh:
        asked = [r["question"] for r in csv.DictReader(fh)]
    assert len(asked) == 2 and all(q.split("\n\n")[0] in questions for q in asked)  # no download
    fid = tmp_path / "fid.json"
    _run(capsys, "eval", "fidelity", "--model", chat_env["model"], "--self-generated", 2,
         "--methods", "full,streaming", "--budgets", "16", "--buffer", 4, "--sinks", 1,
         "--seq-len", 48, "--max-windows", 2, "--json", fid, "--quiet")
    result = json.loads(fid.read_text())
    assert result["windows"] == 2
    assert result["sources"] and set(result["sources"]) <= {"self-generated/0",
                                                            "self-generated/1"}
