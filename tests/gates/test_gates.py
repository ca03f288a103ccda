"""Retention gates: shapes, hooks that detach cleanly, checkpoints, official import."""

from __future__ import annotations

import json

import pytest
import torch

from kvbound.cache import EvictionCache
from kvbound.errors import IncompatibleGatesError, KVBoundError, UnsupportedArchitectureError
from kvbound.gates import RetentionGate, RetentionGates
from kvbound.hooks import detach, get_state
from kvbound.testing import TINY_ARCHS, tiny_model
from tests.rng import gen


def test_gate_shape_and_init():
    gate = RetentionGate(hidden_size=32, num_kv_heads=3, intermediate_size=16, bias_init=8.0)
    x = torch.randn(2, 7, 32, generator=gen(19))
    out = gate(x)
    assert out.shape == (2, 3, 7) and out.dtype == torch.float32
    assert (out <= 0).all()
    expected = torch.nn.functional.logsigmoid(torch.tensor(8.0))
    assert torch.allclose(out, expected.expand_as(out), rtol=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gate(x.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_attach_detach_is_bit_identical(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 100, (2, 16), generator=gen(32))
    with torch.no_grad():
        before = model(ids).logits
    gates = RetentionGates.for_model(model, init_std=0.5, bias_init=1.0).attach(model)
    with torch.no_grad():
        attached = model(ids).logits  # no eviction cache: hooks change nothing
        cache = EvictionCache(model, "trimkv", budget=4, buffer=0)
        model(ids, cache=cache)
        model(ids[:, :3], cache=cache)
    gates.detach(model)
    assert get_state(model) is None
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, attached)
    assert torch.equal(before, after)
    for layer in model.model.layers:
        assert "_kvbound_log_beta" not in layer.self_attn.__dict__
        assert not layer.self_attn._forward_pre_hooks
    assert not model._forward_pre_hooks


def test_gemma3_gates_only_full_attention_layers():
    model = tiny_model("gemma3", num_layers=4)
    gates = RetentionGates.for_model(model)
    types = model.config.layer_types
    assert gates.config.gated_layers == [i for i, t in enumerate(types) if t == "full_attention"]
    assert 0 < len(gates.config.gated_layers) < 4


def test_save_load_roundtrip(tmp_path):
    model = tiny_model("llama")
    gates = RetentionGates.for_model(model, intermediate_size=8, init_std=0.3, seed=3)
    gates.metadata.training["steps"] = 5
    gates.save(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "gates.json").read_text())
    assert meta["config"]["num_layers"] == 2 and meta["digest"] == gates.digest()
    loaded = RetentionGates.load(tmp_path / "g", model)
    assert loaded.digest() == gates.digest()
    assert loaded.metadata.training["steps"] == 5
    x = torch.randn(1, 4, model.config.hidden_size, generator=gen(71))
    assert torch.equal(loaded(0, x), gates(0, x))


def test_gates_for_another_model_are_refused(tmp_path):
    small = tiny_model("llama", num_layers=2)
    other = tiny_model("llama", num_layers=3)
    RetentionGates.for_model(small).save(tmp_path / "g")
    with pytest.raises(IncompatibleGatesError, match="num_layers"):
        RetentionGates.load(tmp_path / "g", other)
    with pytest.raises(IncompatibleGatesError):
        RetentionGates.load(tmp_path / "g").attach(other)


def test_corrupt_and_truncated_checkpoints(tmp_path):
    model = tiny_model("llama")
    RetentionGates.for_model(model).save(tmp_path / "g")
    weights = tmp_path / "g" / "gates.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(KVBoundError, match="corrupt"):
        RetentionGates.load(tmp_path / "g", model)
    (tmp_path / "g" / "gates.json").write_text("{not json")
    with pytest.raises(KVBoundError, match="corrupt"):
        RetentionGates.load(tmp_path / "g", model)
    with pytest.raises(KVBoundError, match="No gates"):
        RetentionGates.load(tmp_path / "missing", model)


def _write_official(path, model, inter=16, bias=8.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    state = {}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.self_attn.retention_gate."
        state[p + "linear1.weight"] = torch.randn(inter, cfg.hidden_size, generator=g) * 0.1
        state[p + "linear1.bias"] = torch.randn(inter, generator=g) * 0.1
        state[p + "linear2.weight"] = torch.randn(cfg.num_key_value_heads, inter, generator=g)
        state[p + "bias"] = torch.full((cfg.num_key_value_heads,), bias)
    path.mkdir()
    torch.save(state, path / "trimkv_weights.pth")
    (path / "config.json").write_text(json.dumps({
        "base_model": "Qwen/Qwen3-tiny", "retention_gate": "rg",
        "retention_gate_intermediate_size": inter, "retention_gate_bias_init": bias,
        "memory_size": 512, "buffer_size": 128}))
    return state


def test_import_official_checkpoint(tmp_path):
    model = tiny_model("qwen3")
    state = _write_official(tmp_path / "official", model)
    gates = RetentionGates.load(tmp_path / "official", model)
    assert gates.config.intermediate_size == 16 and gates.config.base_model == "Qwen/Qwen3-tiny"
    x = torch.randn(1, 5, model.config.hidden_size, generator=gen(123))
    p = "model.layers.1.self_attn.retention_gate."
    h = torch.nn.functional.silu(x @ state[p + "linear1.weight"].T + state[p + "linear1.bias"])
    expected = torch.nn.functional.logsigmoid(h @ state[p + "linear2.weight"].T + state[p + "bias"])
    assert torch.allclose(gates(1, x), expected.transpose(1, 2), atol=1e-5)
    gates.attach(model)
    cache = EvictionCache(model, "trimkv", budget=4, buffer=1)
    with torch.no_grad():
        model(torch.randint(1, 100, (1, 12), generator=gen(131)), cache=cache)
    detach(model)
    # a different model is refused
    with pytest.raises(IncompatibleGatesError):
        RetentionGates.load(tmp_path / "official", tiny_model("qwen3", hidden_size=32))


def test_official_import_rejects_pickles_with_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    model = tiny_model("qwen3")
    d = tmp_path / "evil"
    d.mkdir()
    (d / "trimkv_weights.pth").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(KVBoundError, match="weights-only"):
        RetentionGates.load(d, model)


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        RetentionGates.for_model(model)


def test_shipped_gates_digest_is_the_one_results_report():
    import json

    from kvbound.gates import shipped_gates_dir

    path = shipped_gates_dir("smollm2-135m")
    meta = json.loads((path / "gates.json").read_text())
    assert meta["digest_of"] == "stored"
    assert RetentionGates.load(path).digest() == meta["digest"]
