"""Crash-safe writes: the writer is killed (os._exit, no cleanup runs) between every two
operations of a checkpoint write, and the reader must still find a complete checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGates
from kvbound.io import read_versioned, recover_dir, write_versioned
from kvbound.testing import ByteTokenizer, tiny_model

VERSIONED_STEPS = ["written", "renamed", "pointer", "trashed"]


def _run_child(code: str) -> int:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode in (0, 137), proc.stderr
    return proc.returncode


def _write(root, version: int) -> None:
    def fill(d):
        (d / "a.json").write_text(json.dumps({"version": version}))
        (d / "b.bin").write_bytes(bytes([version]) * 1000)

    write_versioned(root, "ckpt", fill)


def _version_of(d) -> int:
    a = json.loads((d / "a.json").read_text())["version"]
    assert (d / "b.bin").read_bytes() == bytes([a]) * 1000, "files of two versions mixed"
    return a


@pytest.mark.parametrize("step", VERSIONED_STEPS)
def test_kill_at_each_step_of_a_versioned_write_leaves_a_complete_version(tmp_path, step):
    rc = _run_child(f"""
        import json, kvbound.io as io
        from pathlib import Path
        root = Path({str(tmp_path)!r})
        def fill(version):
            def f(d):
                (d / "a.json").write_text(json.dumps({{"version": version}}))
                (d / "b.bin").write_bytes(bytes([version]) * 1000)
            return f
        io.write_versioned(root, "ckpt", fill(1))
        io._KILL_AT = {step!r}
        io.write_versioned(root, "ckpt", fill(2))
    """)
    assert rc == 137, "the injected kill did not happen"
    found = read_versioned(tmp_path, "ckpt")
    assert found is not None
    expected = 1 if step == "written" else 2  # once renamed, the new version is complete
    assert _version_of(found) == expected
    # the next write recovers: a new complete version, leftovers removed
    _write(tmp_path, 3)
    found = read_versioned(tmp_path, "ckpt")
    assert _version_of(found) == 3
    assert (tmp_path / "ckpt.current").read_text().strip() == found.name
    assert {p.name for p in tmp_path.iterdir()} == {"ckpt.current", found.name}


def test_read_versioned_without_anything_is_none_and_reads_the_old_layout(tmp_path):
    assert read_versioned(tmp_path, "ckpt") is None
    legacy = tmp_path / "ckpt"
    legacy.mkdir()
    (legacy / "a.json").write_text("{}")
    assert read_versioned(tmp_path, "ckpt") == legacy


def test_whole_dir_write_killed_between_its_renames_is_recovered(tmp_path):
    target = tmp_path / "results"
    rc = _run_child(f"""
        import kvbound.io as io
        from pathlib import Path
        target = Path({str(target)!r})
        io.atomic_dir_write(target, lambda d: (d / "x.txt").write_text("old"))
        io._KILL_AT = "moved-aside"
        io.atomic_dir_write(target, lambda d: (d / "x.txt").write_text("new"))
    """)
    assert rc == 137
    assert not target.exists()  # the instant the old layout could not cover
    assert recover_dir(target) == target
    assert (target / "x.txt").read_text() == "old"


def test_gates_killed_between_weights_and_metadata_are_refused_with_a_reason(tmp_path):
    d = tmp_path / "gates"
    rc = _run_child(f"""
        import torch, kvbound.io as io
        from kvbound.gates import RetentionGates
        from kvbound.testing import tiny_model
        model = tiny_model("llama")
        RetentionGates.for_model(model, intermediate_size=8, seed=0).save({str(d)!r})
        io._KILL_AT = "replaced:gates.safetensors"
        RetentionGates.for_model(model, intermediate_size=8, seed=1).save({str(d)!r})
    """)
    assert rc == 137
    with pytest.raises(KVBoundError, match="two different saves"):
        RetentionGates.load(d)


def test_gates_saved_in_float16_report_the_digest_they_load_with(tmp_path):
    model = tiny_model("llama")
    gates = RetentionGates.for_model(model, intermediate_size=8, seed=0)
    gates.save(tmp_path / "g", dtype=torch.float16)
    meta = json.loads((tmp_path / "g" / "gates.json").read_text())
    assert meta["digest"] == RetentionGates.load(tmp_path / "g").digest()
    assert meta["digest"] != gates.digest()  # float16 rounding changed the weights


def test_gates_written_under_the_old_name_still_load(tmp_path):
    model = tiny_model("llama")
    gates = RetentionGates.for_model(model, intermediate_size=8, seed=0)
    gates.save(tmp_path / "g")
    meta_path = tmp_path / "g" / "gates.json"
    meta = json.loads(meta_path.read_text())
    meta["format"] = "trimkv-gates"  # what this project wrote before its rename to kvbound
    del meta["digest_of"]
    meta_path.write_text(json.dumps(meta))
    loaded = RetentionGates.load(tmp_path / "g", model)
    assert loaded.digest() == gates.digest()
    meta["format"] = "something-else"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(KVBoundError, match="not a kvbound gate checkpoint"):
        RetentionGates.load(tmp_path / "g")


def _train_cfg(out, steps: int, resume: bool):
    from kvbound.train.trainer import TrainConfig

    return TrainConfig(out=str(out), steps=steps, seq_len=32, batch_size=1, memory_size=8,
                       intermediate_size=8, warmup_steps=1, save_every=1, data="file:" +
                       str(out.parent / "data.txt"), bf16=False, extra={"resume": resume})


def test_resume_without_a_checkpoint_says_so(tmp_path):
    from kvbound.train.trainer import Trainer

    (tmp_path / "data.txt").write_text("some training text for a tiny model. " * 40)
    cfg = _train_cfg(tmp_path / "run", 2, resume=True)
    with pytest.raises(KVBoundError, match=r"no checkpoint in .*\(nothing to resume\)"):
        Trainer(cfg, tiny_model("llama", seed=0), ByteTokenizer(), progress=False).run()


@pytest.mark.parametrize("step", ["written", "renamed", "pointer", "trashed"])
def test_training_killed_inside_a_checkpoint_write_resumes_from_a_complete_one(tmp_path, step):
    from kvbound.train.trainer import Trainer

    (tmp_path / "data.txt").write_text("some training text for a tiny model. " * 40)
    out = tmp_path / "run"
    rc = _run_child(f"""
        import torch, kvbound.io as io
        torch.set_num_threads(1)
        from pathlib import Path
        from kvbound.testing import ByteTokenizer, tiny_model
        from kvbound.train.trainer import Trainer, TrainConfig
        import kvbound.train.trainer as tr
        out = Path({str(out)!r})
        cfg = TrainConfig(out=str(out), steps=4, seq_len=32, batch_size=1, memory_size=8,
                          intermediate_size=8, warmup_steps=1, save_every=1,
                          data="file:" + str(out.parent / "data.txt"), bf16=False)
        real = tr.write_versioned
        calls = []
        def write_versioned(*a, **k):
            calls.append(1)
            if len(calls) == 2:  # the checkpoint after step 2
                io._KILL_AT = {step!r}
            return real(*a, **k)
        tr.write_versioned = write_versioned
        Trainer(cfg, tiny_model("llama", seed=0), ByteTokenizer(), progress=False).run()
    """)
    assert rc == 137
    ckpt = read_versioned(out, "checkpoint")
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["step"] == (1 if step == "written" else 2)
    Trainer(_train_cfg(out, 4, resume=True), tiny_model("llama", seed=0), ByteTokenizer(),
            progress=False).run()
    ref_out = tmp_path / "ref"
    Trainer(_train_cfg(ref_out, 4, resume=False), tiny_model("llama", seed=0), ByteTokenizer(),
            progress=False).run()
    assert RetentionGates.load(out).digest() == RetentionGates.load(ref_out).digest()
