"""Several processes: gate training under torchrun (CPU, gloo) and evaluation sharding.

The training tests launch 2 real processes with ``python -m torch.distributed.run`` on a tiny
llama and compare with one process on the same global batch. 2 processes x ``batch_size`` 1
average two per-example gradients; one process with ``grad_accum`` 2 does the same (loss / 2 per
example, summed), so the gates must agree to float round-off (they are bitwise equal on CPU).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kvbound.errors import KVBoundError
from kvbound.eval.shard import merge_results, rank_world, shard, shard_grid
from kvbound.gates import RetentionGates
from kvbound.io import read_versioned
from kvbound.testing import ByteTokenizer, tiny_model
from kvbound.train.trainer import TrainConfig, Trainer
from tests.helpers import tiny_model_dir

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# Run inside every launched process: train a tiny llama (phase by phase, e.g. interrupted and
# resumed), then dump this rank's gates and what the process group looked like.
WORKER = '''
import json, sys
import torch
import torch.distributed as dist
from kvbound.testing import tiny_model
from kvbound.testing import ByteTokenizer
from kvbound.train.trainer import TrainConfig, Trainer

spec = json.loads(open(sys.argv[1]).read())
for phase in spec["phases"]:
    trainer = Trainer(TrainConfig(**phase["cfg"]), tiny_model("llama", seed=0), ByteTokenizer(),
                      progress=False)
    gates = trainer.run(stop_after=phase.get("stop_after"))
rank = trainer.accelerator.process_index
torch.save(gates.state_dict(), f"{spec['dump']}/rank{rank}.pt")
info = {"rank": rank, "world": trainer.accelerator.num_processes,
        "backend": dist.get_backend() if dist.is_initialized() else None}
open(f"{spec['dump']}/rank{rank}.json", "w").write(json.dumps(info))
'''


def _text_file(path: Path) -> Path:
    rng = random.Random(0)
    words = ("alpha beta gamma delta river stone cloud maple tiger lemon copper violet falcon "
             "harbor meadow lantern quartz").split()
    docs = [" ".join(rng.choice(words) for _ in range(80)) for _ in range(20)]
    path.write_text("\n\n\n".join(docs))
    return path


def _cfg(out: Path, data: Path, **kw) -> dict:
    base = dict(out=str(out), memory_size=8, seq_len=48, steps=4, data=f"file:{data}", seed=0,
                lr=1e-2, warmup_steps=1, intermediate_size=8, bias_init=3.0, save_every=2,
                bf16=False)
    base.update(kw)
    return base


def _launch(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


@needs_gloo
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    data = _text_file(tmp_path / "data.txt")
    out = tmp_path / "two"
    spec = {"dump": str(tmp_path), "phases": [
        {"cfg": _cfg(out, data), "stop_after": 3},  # checkpoint at step 2, then "killed"
        {"cfg": _cfg(out, data, extra={"resume": True})},  # resumed by both ranks
    ]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "worker.py").write_text(WORKER)
    _launch([str(tmp_path / "worker.py"), str(tmp_path / "spec.json")], cwd=tmp_path)

    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(i["rank"], i["world"], i["backend"]) for i in infos] == [(0, 2, "gloo"), (1, 2, "gloo")]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # replicas stay identical

    # one process, same global batch of 2 (examples 2s and 2s+1 at step s), uninterrupted
    model = tiny_model("llama", seed=0)
    for kw in (dict(grad_accum=2), dict(batch_size=2)):
        one_out = tmp_path / f"one-{next(iter(kw))}"
        one = Trainer(TrainConfig(**_cfg(one_out, data, **kw)), model, ByteTokenizer(),
                      progress=False).run()
        for k, v in one.state_dict().items():
            torch.testing.assert_close(ranks[0][k], v, rtol=0, atol=1e-5, msg=k)
        assert len(_log(out)) == len(_log(one_out)) == 4
        for a, b in zip(_log(out), _log(one_out), strict=False):  # metrics averaged over processes
            assert a["tokens"] == b["tokens"] == 96
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-6)

    # rank 0 wrote one log (steps 0..3 across the resume), the checkpoint and the final gates
    assert [r["step"] for r in _log(out)] == [0, 1, 2, 3]
    saved = RetentionGates.load(out, model)
    assert saved.metadata.training["steps_done"] == 4
    for k, v in saved.state_dict().items():
        assert torch.equal(v, ranks[0][k]), k
    assert (read_versioned(out, "checkpoint") / "trainer.pt").exists()
    # the global batch is part of the run: a 2-process checkpoint is not resumed by 1 process
    with pytest.raises(KVBoundError, match="trained with 2"):
        Trainer(TrainConfig(**_cfg(out, data, steps=6, extra={"resume": True})), model,
                ByteTokenizer(), progress=False).run()


@needs_gloo
def test_torchrun_cli(tmp_path):
    """``torchrun --nproc_per_node 2 -m kvbound train ...`` end to end (the real command line)."""
    data = _text_file(tmp_path / "data.txt")
    model_dir = tiny_model_dir(tmp_path / "model", data)
    out = tmp_path / "gates"
    proc = _launch(["-m", "kvbound", "train", "--model", str(model_dir), "--out", str(out),
                    "--data", f"file:{data}", "--seq-len", "32", "--steps", "2", "--save-every",
                    "1", "--memory-size", "8", "--intermediate-size", "8", "--warmup-steps", "1",
                    "--no-bf16", "--quiet"], cwd=tmp_path)
    assert "gates written to" in proc.stdout + proc.stderr
    log = _log(out)
    assert [r["step"] for r in log] == [0, 1] and all(r["tokens"] == 2 * 32 for r in log)
    meta = json.loads((out / "gates.json").read_text())["metadata"]["training"]
    assert meta["steps_done"] == 2 and meta["command"].startswith("kvbound train")


# --------------------------------------------------------------------------- evaluation sharding
@pytest.mark.parametrize("n", range(8))
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_is_a_balanced_partition(n, world):
    items = [f"x{i}" for i in range(n)]
    parts = [shard(items, r, world) for r in range(world)]
    assert sorted(sum(parts, [])) == sorted(items)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts[0] == items[0::world]


@pytest.mark.parametrize("rank,world", [(2, 2), (-1, 2), (0, 0), (0, 1.5)])
def test_shard_rejects_bad_rank_or_world(rank, world):
    with pytest.raises(KVBoundError, match='must be'):
        shard([1, 2, 3], rank, world)


def test_rank_world_from_launcher_env(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_world() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_world() == (3, 4)


def test_shard_grid_covers_tasks_x_methods():
    tasks, methods = ["a", "b", "c"], ["full", "m1", "m2"]
    parts = [shard_grid(tasks, methods, r, 2) for r in range(2)]
    pairs = sorted((t, m) for p in parts for t, ms in p.items() for m in ms)
    assert pairs == sorted((t, m) for t in tasks for m in ("m1", "m2"))


def _without_seconds(x):
    if isinstance(x, dict):
        return {k: _without_seconds(v) for k, v in x.items() if k != "seconds"}
    if isinstance(x, list):
        return [_without_seconds(v) for v in x]
    return x


def _by_key(results):
    return {(r.get("task"), r.get("label", r.get("method")), r["budget"]): _without_seconds(r)
            for r in results}


def test_sharded_fidelity_merges_to_the_unsharded_result(tmp_path):
    from kvbound.eval.fidelity import Window, run_fidelity

    model = tiny_model("llama", seed=1)
    g = torch.Generator().manual_seed(0)
    windows = [Window(f"w{i}", torch.randint(3, 120, (40,), generator=g)) for i in range(2)]
    methods = ["full", "streaming", "knorm"]
    kw = dict(budgets=[8, 16], buffer=4, progress=False)
    whole = run_fidelity(model, ByteTokenizer(), windows, methods=methods, **kw)
    paths = []
    for rank in range(2):
        part = run_fidelity(model, ByteTokenizer(), windows, methods=shard(methods, rank, 2), **kw)
        part["command"] = f"shard {rank}"
        paths.append(tmp_path / f"fid{rank}.json")
        paths[-1].write_text(json.dumps(part))
    merged = merge_results(paths)
    assert _by_key(merged["results"]) == _by_key(whole["results"])
    assert len(merged["results"]) == len(whole["results"]) == 6
    assert merged["commands"] == ["shard 0", "shard 1"]
    assert merged["merged_from"] == [str(p) for p in paths]
    for key in ("windows", "sources", "protocol", "seq_len", "model", "versions"):
        assert merged[key] == whole[key]


def test_sharded_task_eval_merges_to_the_unsharded_summary(tmp_path):
    from kvbound.eval.runner import EvalConfig, run_eval

    model = tiny_model("llama", seed=0)
    tasks, methods = ["syn_needle", "syn_kv_lookup"], ["full", "streaming", "knorm"]
    kw = dict(budgets=[16], buffer=4, chunk=16, limit=2, context_tokens=48, batch_size=2)
    whole = run_eval(model, ByteTokenizer(), EvalConfig(tasks=tasks, methods=methods, **kw),
                     tmp_path / "whole", progress=False)
    paths = []
    for rank in range(2):
        for task, ms in shard_grid(tasks, methods, rank, 2).items():
            out = tmp_path / f"rank{rank}-{task}"
            run_eval(model, ByteTokenizer(), EvalConfig(tasks=[task], methods=ms, **kw), out,
                     progress=False)
            paths.append(out / "results.json")
    merged = merge_results(paths)
    # the full-cache reference of each task ran on both ranks; the merge keeps one copy
    assert len(merged["results"]) == len(whole["results"]) == 2 * 3
    assert _by_key(merged["results"]) == _by_key(json.loads(json.dumps(whole["results"])))
    assert sorted(merged["config"]["tasks"]) == sorted(tasks)
    assert sorted(merged["config"]["methods"]) == ["knorm", "streaming"]
    assert merged["model"] == whole["model"]
    from kvbound.eval.report import write_report

    write_report(merged, tmp_path / "merged")  # the merged summary feeds the usual report
    assert (tmp_path / "merged" / "results.md").exists()


def test_merge_refuses_results_of_different_evaluations(tmp_path):
    def write(name, **doc):
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        return path

    row = {"method": "streaming", "label": "streaming", "budget": 8, "kl_mean": 0.1,
           "seconds": 1.0}
    a = write("a.json", model="m", seconds=1.0, results=[row])
    same = write("same.json", model="m", seconds=2.0, results=[{**row, "seconds": 9.0}])
    merged = merge_results([a, same])
    assert len(merged["results"]) == 1 and merged["seconds"] == 3.0
    other_model = write("b.json", model="other", results=[])
    with pytest.raises(KVBoundError, match="disagree on 'model'"):
        merge_results([a, other_model])
    conflict = write("c.json", model="m", results=[{**row, "kl_mean": 0.2}])
    with pytest.raises(KVBoundError, match="Conflicting results"):
        merge_results([a, conflict])
    seeds = [write(f"s{s}.json", config={"seed": s, "tasks": ["t"]}, results=[]) for s in (0, 1)]
    with pytest.raises(KVBoundError, match="config.seed"):
        merge_results(seeds)
    with pytest.raises(KVBoundError, match="not a result file"):
        merge_results([write("bad.json", foo=1)])
    with pytest.raises(KVBoundError, match="at least one"):
        merge_results([])
