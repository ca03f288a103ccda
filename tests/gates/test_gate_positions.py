"""The gates' optional position input: zero at the start, positions as the cache and training
see them (absolute, padding excluded), staged decode = per-token gate, saved and trained."""

from __future__ import annotations

import pytest
import torch

from kvbound.cache import EvictionCache
from kvbound.errors import KVBoundError
from kvbound.gates import POSITION_SCALES, RetentionGate, RetentionGates, position_features
from kvbound.hooks import detach
from kvbound.testing import ByteTokenizer, tiny_model
from tests.helpers import gates_with_random
from tests.rng import gen


def _gates(model, seed=5):
    """Positional gates whose position weights are not zero (so positions change log beta)."""
    return gates_with_random(model, "position", seed, position_input=True)


def test_features_are_one_at_the_start_and_fade():
    f = position_features(torch.tensor([[0, 1, 63, 10_000, -1]]))
    assert f.shape == (1, 5, len(POSITION_SCALES))
    assert torch.equal(f[0, 0], torch.ones(len(POSITION_SCALES)))
    assert torch.equal(f[0, 4], f[0, 0])  # padding (-1) reads as position 0
    assert (f[0, 1] < f[0, 0]).all() and (f[0, 2] < f[0, 1]).all()
    assert (f[0, 3] < 0.01).all()  # far from the start: no position signal left


def test_a_fresh_positional_gate_computes_what_a_plain_one_does():
    x = torch.randn(2, 9, 32, generator=gen(401))
    pos = torch.arange(9).expand(2, -1)
    torch.manual_seed(0)
    plain = RetentionGate(32, 3, 16, init_std=0.3)
    torch.manual_seed(0)
    positional = RetentionGate(32, 3, 16, init_std=0.3, position_input=True)
    assert positional.uses_positions and not plain.uses_positions
    assert torch.equal(positional(x, pos), plain(x))
    with torch.no_grad():
        positional.position.weight.fill_(1.0)
    early, late = positional(x, torch.zeros_like(pos)), positional(x, torch.full_like(pos, 500))
    assert not torch.allclose(early, late)
    with pytest.raises(KVBoundError, match="positions"):
        positional(x)


def test_positional_gates_save_and_load(tmp_path):
    model = tiny_model("llama")
    gates = _gates(model)
    gates.save(tmp_path / "g")
    loaded = RetentionGates.load(tmp_path / "g", model)
    assert loaded.uses_positions and loaded.digest() == gates.digest()
    x = torch.randn(1, 4, model.config.hidden_size, generator=gen(402))
    pos = torch.tensor([[0, 1, 2, 3]])
    assert torch.equal(loaded(0, x, pos), gates(0, x, pos))
    plain = RetentionGates.for_model(model)
    assert not plain.uses_positions and not plain.config.position_input


@pytest.mark.parametrize("budget,buffer", [(64, 4), (8, 4), (8, 0)])
def test_cache_gives_the_gate_each_tokens_absolute_position(budget, buffer):
    """Prompt chunks and staged decode tokens get log beta = gate(hidden, its position)."""
    from kvbound.architectures import attention_modules

    model = tiny_model("llama", seed=2)
    gates = _gates(model).attach(model)
    ids = torch.randint(1, 100, (1, 35), generator=gen(403))
    cache = EvictionCache(model, "trimkv", budget=budget, buffer=buffer)
    ref: dict[int, list] = {i: [] for i in cache.evicted}
    seen = {"n": 0}

    def capture(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        q = hidden.shape[1]
        pos = torch.arange(seen["n"], seen["n"] + q)[None]
        ref[module.layer_idx].append(gates(module.layer_idx, hidden, pos)[0])

    handles = [a.register_forward_pre_hook(capture, with_kwargs=True)
               for a in attention_modules(model)]
    try:
        with torch.no_grad():
            for a, b in [(0, 10)] + [(t, t + 1) for t in range(10, 35)]:
                model(ids[:, a:b], cache=cache)
                seen["n"] = b
    finally:
        for h in handles:
            h.remove()
        detach(model)
    for idx in cache.evicted:
        layer = cache.layers[idx]
        want = torch.cat(ref[idx], dim=-1).gather(1, layer.positions[0])
        torch.testing.assert_close(layer.log_beta[0], want, atol=1e-6, rtol=1e-5)
    if budget < 35:
        assert cache.stats().evictions > 0


def test_left_padding_does_not_shift_the_positions_a_gate_sees():
    model = tiny_model("llama", seed=2)
    _gates(model).attach(model)
    row = torch.randint(1, 100, (1, 12), generator=gen(404))
    other = torch.randint(1, 100, (1, 15), generator=gen(405))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), row], 1), other])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    try:
        alone = EvictionCache(model, "trimkv", budget=64, buffer=4)
        padded = EvictionCache(model, "trimkv", budget=64, buffer=4)
        with torch.no_grad():
            model(row, cache=alone)
            model(batch, attention_mask=mask, cache=padded)
    finally:
        detach(model)
    for idx in alone.evicted:
        torch.testing.assert_close(padded.layers[idx].log_beta[0, :, 3:],
                                   alone.layers[idx].log_beta[0], atol=1e-5, rtol=1e-4)


def test_training_moves_the_position_weights(tmp_path):
    from kvbound.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(out=str(tmp_path / "run"), memory_size=8, seq_len=48, steps=3,
                      data="prose", seed=0, lr=1e-2, warmup_steps=1, intermediate_size=8,
                      bias_init=3.0, save_every=3, bf16=False, train_sinks=0,
                      gate_positions=True)
    gates = Trainer(cfg, tiny_model("llama", seed=0), ByteTokenizer(), progress=False).run()
    assert gates.uses_positions
    moved = [gates[i].position.weight.abs().sum().item() for i in gates.config.gated_layers]
    assert all(m > 0 for m in moved)
    again = RetentionGates.load(tmp_path / "run")
    assert again.uses_positions and again.digest() == gates.digest()


@pytest.mark.parametrize("buffer", [0, 4])
def test_static_decoding_with_positional_gates_equals_dynamic(buffer):
    model = tiny_model("llama", seed=0)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    _gates(model).attach(model)
    ids = torch.randint(1, 100, (2, 20), generator=gen(406))
    kw = dict(do_sample=False, disable_compile=True, max_new_tokens=30, prefill_chunk_size=8)
    try:
        dyn = EvictionCache(model, "trimkv", budget=8, buffer=buffer)
        sta = EvictionCache(model, "trimkv", budget=8, buffer=buffer, static=True)
        a = model.generate(ids, cache=dyn, **kw)
        b = model.generate(ids, cache=sta, **kw)
    finally:
        detach(model)
    assert torch.equal(a, b)
    for idx in sta.evicted:
        assert torch.equal(sta.resident_positions(idx), dyn.resident_positions(idx))
        torch.testing.assert_close(sta.layers[idx].log_beta, dyn.layers[idx].log_beta)
