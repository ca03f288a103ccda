"""Gate training on tiny models: only gates change, exact resume, data determinism."""

from __future__ import annotations

import json

import pytest
import torch

from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGates
from kvbound.hooks import get_state
from kvbound.testing import ByteTokenizer, tiny_model
from kvbound.train.data import Mixture, parse_spec
from kvbound.train.trainer import TrainConfig, Trainer
from tests.rng import gen


def _cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), memory_size=8, seq_len=48, steps=4, data="prose",
                seed=0, lr=1e-2, warmup_steps=1, intermediate_size=8, bias_init=3.0,
                save_every=2, bf16=False)
    base.update(kw)
    return TrainConfig(**base)


def _train(cfg, stop_after=None, model=None):
    model = model or tiny_model("llama", seed=0)
    return Trainer(cfg, model, ByteTokenizer(), progress=False).run(stop_after=stop_after), model


def test_only_gates_change_and_model_is_restored(tmp_path):
    model = tiny_model("qwen3", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 100, (1, 20), generator=gen(34))
    with torch.no_grad():
        logits = model(ids).logits
    gates, _ = _train(_cfg(tmp_path), model=model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    fresh = RetentionGates.for_model(model, intermediate_size=8, bias_init=3.0, seed=0)
    moved = [not torch.equal(a, b) for a, b in zip(gates.parameters(), fresh.parameters(), strict=False)]
    assert all(moved)
    assert get_state(model) is None and model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    saved = RetentionGates.load(tmp_path / "run", model)
    assert saved.digest() == gates.digest()
    assert saved.metadata.training["steps_done"] == 4
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    assert all(r["loss"] > 0 and r["cap"] >= 0 for r in log)


def test_capacity_loss_lowers_retention(tmp_path):
    gates, model = _train(_cfg(tmp_path, steps=8, memory_size=2, lambda_cap=10.0))
    fresh = RetentionGates.for_model(model, intermediate_size=8, bias_init=3.0, seed=0)
    x = torch.randn(1, 30, model.config.hidden_size, generator=gen(57))
    assert gates(0, x).mean() < fresh(0, x).mean()  # shorter memory to fit M = 2


def test_resume_is_exact(tmp_path):
    full, _ = _train(_cfg(tmp_path / "a", steps=6))
    cfg = _cfg(tmp_path / "b", steps=6)
    _train(cfg, stop_after=3)  # checkpoints at step 2 only (save_every=2)
    assert not (tmp_path / "b" / "run" / "gates.json").exists()
    cfg = _cfg(tmp_path / "b", steps=6, extra={"resume": True})
    resumed, _ = _train(cfg)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=False):
        assert torch.equal(a, b)
    log = [json.loads(x) for x in (tmp_path / "b" / "run" / "train_log.jsonl").read_text()
           .splitlines()]
    assert [r["step"] for r in log] == list(range(6))


def test_resume_with_other_settings_is_refused(tmp_path):
    _train(_cfg(tmp_path, steps=2))
    with pytest.raises(KVBoundError, match="different configuration"):
        _train(_cfg(tmp_path, steps=4, memory_size=16, extra={"resume": True}))


def test_data_mixture_is_deterministic_and_mixed(tmp_path):
    tok = ByteTokenizer()
    text = tmp_path / "t.txt"
    text.write_text("alpha beta gamma. " * 50 + "\n\n\n" + "delta epsilon. " * 50)
    m1 = Mixture(f"prose:1,synthetic:1,file:{text}:1", tok, 64, seed=3)
    m2 = Mixture(f"prose:1,synthetic:1,file:{text}:1", tok, 64, seed=3)
    sources = set()
    for i in range(30):
        a, b = m1.example(i), m2.example(i)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.target_mask, b.target_mask)
        assert len(a.input_ids) <= 64 and a.target_mask.any()
        sources.add(a.source.split("/")[0])
    assert sources == {"prose", "synthetic", "file:t.txt"}
    other = Mixture(f"prose:1,synthetic:1,file:{text}:1", tok, 64, seed=4)
    assert any(not torch.equal(other.example(i).input_ids, m1.example(i).input_ids)
               for i in range(10)), "the seed does not change the data"


def test_synthetic_targets_are_the_answer():
    tok = ByteTokenizer()
    mix = Mixture("synthetic", tok, 400, seed=1)
    import re

    kinds = set()
    for i in range(24):
        ex = mix.example(i)
        kind = ex.source.split("/")[1]
        kinds.add(kind)
        answer = tok.decode(ex.input_ids[1:][ex.target_mask[:-1]])
        full = tok.decode(ex.input_ids)
        assert ex.target_mask.sum() < len(ex.input_ids) / 3
        # the targets are exactly the final assistant turn, nothing of the question
        assert answer.startswith("assistant: ") and full.endswith(answer)
        reply = answer.removeprefix("assistant: ").strip()
        question = full[: -len(answer)]
        if kind == "lookup":  # the value listed for the asked key
            key = re.search(r"belongs to the label '(\w+)'", question).group(1)
            assert re.search(rf"^{key} = (\S+)$", question, re.M).group(1) == reply
        elif kind == "needle":  # the value of the asked fact, stated in the haystack
            subject = re.search(r"Which value was given for (.+)\?", question).group(1)
            value = re.search(rf"Keep in mind that {re.escape(subject)} is (\d+)\.", question)
            assert reply == f"It was {value.group(1)}."
        elif kind == "conversation":  # what the user said in the first turns
            said = reply.removeprefix("Yes: ").rstrip(".")
            assert said.split(" is ")[-1] in question
        elif kind == "state":  # the start count plus the additions minus what was handed on
            start = int(re.search(r"At first, \w+ owns (\d+)", question).group(1))
            added = sum(map(int, re.findall(r"adds (\d+)", question)))
            handed = sum(map(int, re.findall(r"hands (\d+)", question)))
            assert reply == f"The final count is {start + added - handed}."
    assert kinds == {"needle", "lookup", "conversation", "state"}


@pytest.mark.parametrize("spec,match", [("nope:1", "Unknown data source"), ("file", "argument"),
                                        ("prose:0", "> 0"), ("", "Empty")])
def test_bad_data_spec(spec, match):
    with pytest.raises(KVBoundError, match=match):
        parse_spec(spec)


def test_bad_config():
    with pytest.raises(KVBoundError, match="memory_size"):
        TrainConfig(memory_size=0).validate()


def test_bf16_autocast_only_with_native_cpu_support(monkeypatch):
    """An AVX2-only CPU emulates bf16 (~20x slower than fp32): training must stay in fp32 there."""
    from kvbound.train.trainer import _bf16_ok

    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in [(False, False, False), (True, False, True),
                                       (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert _bf16_ok(cpu) is expected
    assert _bf16_ok(torch.device("meta")) is False


def test_init_gates_starts_from_trained_gates_and_adds_positions(tmp_path):
    """--init-gates: the fine-tuning run starts exactly where the source gates are (a new position
    input keeps its zero init), records where it came from, and refuses another gate width."""
    model = tiny_model("llama", seed=0)
    source, _ = _train(_cfg(tmp_path / "a", steps=2), model=model)
    trainer = Trainer(_cfg(tmp_path / "b", steps=2, gate_positions=True,
                           init_gates=str(tmp_path / "a" / "run")),
                      model, ByteTokenizer(), progress=False)
    trainer._setup()
    x = torch.randn(1, 12, model.config.hidden_size, generator=gen(58))
    positions = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.allclose(trainer.gates(0, x, positions), source(0, x), atol=1e-6)
    tuned = trainer.run()
    assert tuned.uses_positions
    assert tuned.metadata.training["init_gates"]["ref"] == source.ref()
    saved = RetentionGates.load(tmp_path / "b" / "run", model)
    assert saved.metadata.training["init_gates"]["steps"] == 2
    with pytest.raises(KVBoundError, match="--intermediate-size 8"):
        Trainer(_cfg(tmp_path / "c", intermediate_size=4, init_gates=str(tmp_path / "a" / "run")),
                model, ByteTokenizer(), progress=False)._setup()


def test_init_gates_widens_function_preservingly_and_the_new_units_train(tmp_path):
    """--init-gates with a larger --intermediate-size: step 0 computes exactly what the source
    does (source units copied, extra units silent), the extra units then learn, and the
    provenance says the gates were widened."""
    model = tiny_model("llama", seed=0)
    source, _ = _train(_cfg(tmp_path / "a", steps=2), model=model)
    trainer = Trainer(_cfg(tmp_path / "w", steps=3, intermediate_size=24, gate_positions=True,
                           init_gates=str(tmp_path / "a" / "run")),
                      model, ByteTokenizer(), progress=False)
    trainer._setup()
    x = torch.randn(2, 12, model.config.hidden_size, generator=gen(59))
    positions = torch.arange(12)[None].expand(2, 12)
    with torch.no_grad():
        assert torch.allclose(trainer.gates(0, x, positions), source(0, x), atol=1e-6)
    assert trainer.gates[0].linear2.weight[:, 8:].abs().max() == 0
    wide = trainer.run()
    assert wide.config.intermediate_size == 24
    assert wide[0].linear2.weight[:, 8:].abs().max() > 0  # the extra units took part
    assert wide.metadata.training["init_gates"]["widened_from"] == 8


def test_evict_aware_student_sees_top_m_eviction(tmp_path):
    """--evict-aware: the same first step, with the student's keys outside the top-M masked, is
    further from the teacher than the soft decay alone (M = 4 of 48 tokens); the knob is saved."""
    def first_kl(**kw):
        _train(_cfg(tmp_path / str(kw), steps=1, memory_size=4, **kw))
        log = (tmp_path / str(kw) / "run" / "train_log.jsonl").read_text().splitlines()
        return json.loads(log[0])["kl"]

    assert first_kl(evict_aware=True) > 2 * first_kl()
    saved = RetentionGates.load(tmp_path / str({"evict_aware": True}) / "run")
    assert saved.metadata.training["config"]["evict_aware"] is True
    with pytest.raises(KVBoundError, match="evict_tau"):
        _cfg(tmp_path, evict_tau=0.0).validate()


def test_evict_budgets_cycle_one_per_step(tmp_path):
    """--evict-budgets: step s trains at budgets[s % n] (eviction and capacity loss); its first
    step is exactly the step of a run at that single budget, and the log says which M ran."""
    _train(_cfg(tmp_path / "one", steps=1, memory_size=4, evict_aware=True))
    _train(_cfg(tmp_path / "cyc", steps=3, evict_aware=True, evict_budgets=[4, 40]))
    one = [json.loads(x) for x in (tmp_path / "one" / "run" / "train_log.jsonl").read_text().splitlines()]
    cyc = [json.loads(x) for x in (tmp_path / "cyc" / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["budget"] for r in cyc] == [4, 40, 4]
    assert cyc[0]["kl"] == one[0]["kl"] and cyc[0]["cap"] == one[0]["cap"]
    with pytest.raises(KVBoundError, match="needs evict_aware"):
        _cfg(tmp_path, evict_budgets=[4]).validate()
    with pytest.raises(KVBoundError, match="needs evict_aware"):
        _cfg(tmp_path, evict_decay=False).validate()


def test_evict_no_decay_trains_on_the_mask_alone(tmp_path):
    """--evict-no-decay: the student's logits lose the soft decay (so its first-step KL differs
    from the run with it), the gates still get a gradient, and the setting is saved."""
    def first(**kw):
        gates, _ = _train(_cfg(tmp_path / str(kw), steps=1, memory_size=8, evict_aware=True,
                               train_sinks=0, **kw))  # 4 sinks would fill M=4: a hard mask
        log = (tmp_path / str(kw) / "run" / "train_log.jsonl").read_text().splitlines()
        return json.loads(log[0]), gates

    with_decay, g1 = first()
    alone, g2 = first(evict_decay=False)
    assert alone["kl"] != with_decay["kl"] and alone["grad_norm"] > 0
    assert g2.metadata.training["config"]["evict_decay"] is False
    assert any(not torch.equal(a, b) for a, b in zip(g1.state_dict().values(),
                                                     g2.state_dict().values(), strict=False))
    with pytest.raises(KVBoundError, match="positive integers"):
        _cfg(tmp_path, evict_aware=True, evict_budgets=[4, 0]).validate()


def test_position_lr_scale_moves_the_position_input_faster(tmp_path):
    """--position-lr-scale: the gates' position input gets lr x scale, the rest lr; one step of
    AdamW moves each position weight by ~scale times more than at scale 1; saved and validated."""
    def position_step(scale):
        gates, _ = _train(_cfg(tmp_path / str(scale), steps=1, warmup_steps=0, gate_positions=True,
                               position_lr_scale=scale, weight_decay=0.0, train_sinks=0))
        return torch.cat([g.position.weight.abs().flatten() for g in gates.gates.values()]), gates

    slow, _ = position_step(1.0)
    fast, gates = position_step(10.0)
    assert slow.max() > 0  # zero-initialised: anything non-zero is the first step's move
    assert float(fast.max()) == pytest.approx(10 * float(slow.max()), rel=0.05)
    assert gates.metadata.training["config"]["position_lr_scale"] == 10.0
    with pytest.raises(KVBoundError, match="needs gate_positions"):
        _cfg(tmp_path, position_lr_scale=2.0).validate()
    with pytest.raises(KVBoundError, match="must be > 0"):
        _cfg(tmp_path, gate_positions=True, position_lr_scale=0.0).validate()


def test_train_position_only_leaves_the_rest_of_the_gates_as_they_were(tmp_path):
    """--train-position-only: from trained gates, only the position input moves."""
    src, model = _train(_cfg(tmp_path / "src", steps=1))
    src.save(tmp_path / "src_gates")
    gates, _ = _train(_cfg(tmp_path / "pos", steps=2, warmup_steps=0, gate_positions=True,
                           init_gates=str(tmp_path / "src_gates"), train_position_only=True,
                           position_lr_scale=10.0, train_sinks=0), model=model)
    before = src.state_dict()
    moved = {k for k, v in gates.state_dict().items()
             if k not in before or not torch.equal(v, before[k])}
    assert moved and all(".position." in f".{k}" for k in moved), moved
    with pytest.raises(KVBoundError, match="needs gate_positions and init_gates"):
        _cfg(tmp_path, gate_positions=True, train_position_only=True).validate()


def test_freeze_positions_trains_everything_but_the_position_input(tmp_path):
    """--freeze-positions: from trained gates with a position input, that input stays as it was
    and the rest of the gate trains."""
    src, model = _train(_cfg(tmp_path / "src", steps=1, gate_positions=True,
                             position_lr_scale=10.0, train_sinks=0))
    src.save(tmp_path / "src_gates")
    gates, _ = _train(_cfg(tmp_path / "rest", steps=2, warmup_steps=0, gate_positions=True,
                           init_gates=str(tmp_path / "src_gates"), freeze_positions=True,
                           train_sinks=0), model=model)
    before = src.state_dict()
    moved = {k for k, v in gates.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and not any(".position." in f".{k}" for k in moved), moved
    assert any(".position." in f".{k}" and before[k].abs().max() > 0 for k in before)
    with pytest.raises(KVBoundError, match="needs gate_positions and init_gates"):
        _cfg(tmp_path, gate_positions=True, freeze_positions=True).validate()
    with pytest.raises(KVBoundError, match="exclude each other"):
        _cfg(tmp_path, gate_positions=True, init_gates="x", freeze_positions=True,
             train_position_only=True).validate()
