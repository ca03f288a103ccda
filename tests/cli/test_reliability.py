"""Bad input, faults and long runs: every public entry point fails clearly, nothing half-written.

``SCENARIOS`` is also run by ``benchmarks/reliability.py`` to write docs/RELIABILITY.md from the
library's actual behaviour.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvbound.cache import EvictionCache
from kvbound.cli import app
from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGates
from kvbound.generation import generate
from kvbound.hooks import detach
from kvbound.io import read_versioned
from kvbound.models import load_model
from kvbound.testing import ByteTokenizer, tiny_model
from tests.rng import gen


def _gated(arch="llama", **kw):
    model = tiny_model(arch, **kw)
    RetentionGates.for_model(model).attach(model)
    return model


def _truncated_gates(tmp: Path):
    model = tiny_model("llama")
    RetentionGates.for_model(model).save(tmp / "g")
    f = tmp / "g" / "gates.safetensors"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    RetentionGates.load(tmp / "g", model)


def _truncated_official(tmp: Path):
    model = tiny_model("qwen3")
    d = tmp / "official"
    d.mkdir()
    torch.save({"model.layers.0.self_attn.retention_gate.bias": torch.zeros(2)},
               d / "trimkv_weights.pth")
    data = (d / "trimkv_weights.pth").read_bytes()
    (d / "trimkv_weights.pth").write_bytes(data[: len(data) // 2])
    RetentionGates.load(d, model)


def _pickle_with_code(tmp: Path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    d = tmp / "evil"
    d.mkdir()
    (d / "trimkv_weights.pth").write_bytes(pickle.dumps({"x": Evil()}))
    RetentionGates.load(d, tiny_model("qwen3"))


def _other_model_gates(tmp: Path):
    RetentionGates.for_model(tiny_model("llama", num_layers=2)).save(tmp / "g")
    RetentionGates.load(tmp / "g", tiny_model("llama", num_layers=3))


def _nan_gates(tmp: Path):
    model = tiny_model("llama")
    gates = RetentionGates.for_model(model).attach(model)
    with torch.no_grad():
        gates[1].linear2.weight.fill_(float("inf"))
    cache = EvictionCache(model, "trimkv", budget=4, buffer=0)
    try:
        model(torch.randint(3, 100, (1, 8), generator=gen(84)), cache=cache)
        model(torch.randint(3, 100, (1, 1), generator=gen(85)), cache=cache)  # the first eviction scores them
    finally:
        detach(model)


def _long_prompt_full(tmp: Path):
    model = tiny_model("llama", max_position_embeddings=32)
    generate(model, ByteTokenizer(), torch.randint(3, 100, (1, 40), generator=gen(92)), method="full",
             max_new_tokens=2)


def _unsupported(tmp: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    EvictionCache(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)),
                  "streaming", budget=8)


def _unknown_task(tmp: Path):
    from kvbound.eval.tasks import get_task

    get_task("needle_in_a_haystack")


#: (what was tried, callable(tmp_path), expected exception or warning class, text the message
#: must contain)
SCENARIOS = [
    ("budget = 0", lambda t: EvictionCache(_gated(), "trimkv", budget=0), KVBoundError,
     "budget must be >= 1"),
    ("budget not an integer (8.5)", lambda t: EvictionCache(_gated(), "trimkv", budget=8.5),
     KVBoundError, "budget must be an integer"),
    ("buffer = -1", lambda t: EvictionCache(_gated(), "trimkv", budget=8, buffer=-1), KVBoundError,
     "buffer must be >= 0"),
    ("sinks >= budget", lambda t: EvictionCache(_gated(), "trimkv", budget=4, sinks=4),
     KVBoundError, "sinks (4) must be smaller"),
    ("chunk = 0", lambda t: generate(_gated(), ByteTokenizer(), "hello", chunk=0,
                                     max_new_tokens=2), KVBoundError, "chunk must be a positive"),
    ("unknown method", lambda t: EvictionCache(_gated(), "snap", budget=8), KVBoundError,
     "Valid: full, trimkv, streaming"),
    ("unknown model name", lambda t: load_model("smolm2-135m"), KVBoundError, "did you mean"),
    ("unknown task", _unknown_task, KVBoundError, "syn_needle"),
    ("trimkv without gates", lambda t: EvictionCache(tiny_model("llama"), "trimkv", budget=8),
     KVBoundError, "needs retention gates"),
    ("gates made for another model", _other_model_gates, KVBoundError, "num_layers: gates 2"),
    ("truncated gates.safetensors", _truncated_gates, KVBoundError, "corrupt or truncated"),
    ("truncated official trimkv_weights.pth", _truncated_official, KVBoundError, "Cannot read"),
    ("official .pth holding code (pickle)", _pickle_with_code, KVBoundError, "weights-only"),
    ("gate produces inf/NaN", _nan_gates, KVBoundError, "layer 1"),
    ("empty prompt", lambda t: generate(_gated(), ByteTokenizer(), "", max_new_tokens=2),
     KVBoundError, "prompt is empty"),
    ("prompt beyond the model's context, full cache", _long_prompt_full, UserWarning,
     "exceed the model's context (32)"),
    ("unsupported architecture (GPT-2)", _unsupported, KVBoundError, "Supported: llama"),
]


@pytest.mark.parametrize("name,fn,exc,match", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenario(name, fn, exc, match, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if issubclass(exc, Warning):
        with pytest.warns(exc, match=match.replace("(", r"\(").replace(")", r"\)")):
            fn(tmp_path)
        return
    with pytest.raises(exc) as info:
        fn(tmp_path)
    assert match in str(info.value)


@pytest.mark.parametrize("args,match", [
    (["generate", "--prompt", "hi", "--method", "snap"], "Unknown method 'snap'"),
    (["generate", "--prompt", "hi", "--budget", "0"], "'--budget'"),
    (["generate", "--prompt", "hi", "--buffer", "-2"], "'--buffer'"),
    (["generate", "--prompt", "hi", "--chunk", "0"], "'--chunk'"),
    (["generate", "--prompt", "   "], "--prompt: the text is empty"),
    (["generate"], "exactly one of --prompt"),
    (["eval", "fidelity", "--methods", "full,foo"], "Unknown method 'foo'"),
    (["eval", "tasks", "--tasks", "nope"], "Unknown evaluation task"),
    (["train", "--out", "x", "--data", "nope:1", "--steps", "0"], "steps"),
])
def test_cli_errors_are_clean(args, match):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert "Traceback" not in result.output


_TRAIN_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from kvbound.testing import tiny_model
    from kvbound.testing import ByteTokenizer
    from kvbound.train.trainer import TrainConfig, Trainer
    out, steps, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    cfg = TrainConfig(out=out, memory_size=8, seq_len=48, steps=steps, data="prose", seed=0,
                      lr=1e-2, warmup_steps=1, intermediate_size=8, bias_init=3.0, save_every=1,
                      bf16=False, extra={"resume": resume})
    Trainer(cfg, tiny_model("llama", seed=0), ByteTokenizer(), progress=False).run()
""")


def test_killed_training_resumes_from_last_complete_checkpoint(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_TRAIN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 40
    subprocess.run([sys.executable, str(script), str(tmp_path / "ref"), str(steps), "0"],
                   check=True, env=env)
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(run), str(steps), "0"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and read_versioned(run, "checkpoint") is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found = read_versioned(run, "checkpoint")
    assert found is not None, "no checkpoint was written before the kill"
    ckpt = found / "trainer.pt"
    # whatever step it died at, the checkpoint directory is complete and loadable
    state = torch.load(ckpt, weights_only=True)
    assert 1 <= state["step"] < steps, "the run finished before it could be killed"
    subprocess.run([sys.executable, str(script), str(run), str(steps), "1"], check=True, env=env)
    ref = RetentionGates.load(tmp_path / "ref")
    resumed = RetentionGates.load(run)
    assert resumed.digest() == ref.digest()
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(steps))


_FLAT_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    torch.set_num_threads(1)
    from kvbound.cache import EvictionCache
    from kvbound.gates import RetentionGates
    from kvbound.testing import tiny_model
    model = tiny_model("llama", num_layers=1, max_position_embeddings=200_000)
    RetentionGates.for_model(model).attach(model)
    cache = EvictionCache(model, "trimkv", budget=64, buffer=16, positions="absolute")
    chunk, total = 64, 100_000
    ids = torch.randint(3, 100, (1, chunk), generator=torch.Generator().manual_seed(0))
    rss = []
    with torch.no_grad():
        for i in range(0, total, chunk):
            n = min(chunk, total - i)
            model(ids[:, :n], cache=cache)
            if i // chunk % 200 == 0:
                rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    layer = cache.layers[0]
    print(json.dumps({"rss": rss, "seen": cache.stats().seen_tokens,
                      "seq": int(cache.get_seq_length()),
                      "peak": cache.stats().peak_tokens_per_head,
                      "row_seen": layer.row_seen.tolist(), "capacity": layer.capacity}))
""")


def test_100k_tokens_flat_memory_and_exact_counter():
    # a fresh process: ru_maxrss is the lifetime peak, so in the test process it measures nothing
    proc = subprocess.run([sys.executable, "-c", _FLAT_MEMORY_SCRIPT], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["seen"] == out["seq"] == 100_000 and out["row_seen"] == [100_000]
    assert out["peak"] <= 64 + 16 + 64 and out["capacity"] <= 2 * (64 + 16 + 64)
    rss = out["rss"]
    assert len(rss) == 8 and rss[1] > rss[0] // 2
    # peak RSS after warm-up grows by less than 20 MB over the remaining ~95K tokens
    assert (rss[-1] - rss[1]) / 1024 < 20, rss


def test_bounded_absolute_positions_warn_once_past_the_context():
    model = _gated(max_position_embeddings=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(model, ByteTokenizer(), torch.randint(3, 100, (1, 30), generator=gen(240)),
                 method="trimkv", budget=8, buffer=2, max_new_tokens=8, chunk=4,
                 positions="absolute")
    past = [w for w in caught if "max_position_embeddings (32)" in str(w.message)]
    assert len(past) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the context: no warning
        generate(model, ByteTokenizer(), torch.randint(3, 100, (1, 20), generator=gen(241)),
                 method="trimkv", budget=8, buffer=2, max_new_tokens=8, chunk=4,
                 positions="absolute")
