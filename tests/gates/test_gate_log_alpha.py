"""Gates with an initial importance (``log_alpha``): zero at the start (the paper's score), the
cache scores ``log alpha + age x log beta`` with the right value for every kept token (prompt
chunks and staged decode tokens, per-head and global budgets), saved, and trained by the
attention-rank objective only."""

from __future__ import annotations

import pytest
import torch

from kvbound.architectures import attention_modules
from kvbound.cache import EvictionCache
from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGate, RetentionGates
from kvbound.testing import ByteTokenizer, tiny_model
from tests.helpers import gates_with_random
from tests.rng import gen


def _gates(model, seed=7):
    """Log-alpha gates whose alpha read-out is not zero (so it changes the ranking)."""
    return gates_with_random(model, "alpha", seed, log_alpha=True)


def test_a_fresh_log_alpha_gate_is_the_papers_gate():
    x = torch.randn(2, 9, 32, generator=gen(501))
    torch.manual_seed(0)
    plain = RetentionGate(32, 3, 16, init_std=0.3)
    torch.manual_seed(0)
    gate = RetentionGate(32, 3, 16, init_std=0.3, log_alpha=True)
    assert plain.outputs == ("log_beta",) and gate.outputs == ("log_beta", "log_alpha")
    out = gate.retention(x)
    assert torch.equal(out["log_beta"], plain(x)) and torch.equal(gate(x), plain(x))
    assert out["log_alpha"].shape == (2, 3, 9) and not out["log_alpha"].any()


def test_log_alpha_gates_save_and_load(tmp_path):
    model = tiny_model("llama")
    gates = _gates(model)
    gates.save(tmp_path / "g")
    loaded = RetentionGates.load(tmp_path / "g", model)
    assert loaded.config.log_alpha and loaded.outputs == ("log_beta", "log_alpha")
    assert loaded.digest() == gates.digest()
    x = torch.randn(1, 4, model.config.hidden_size, generator=gen(502))
    for name in ("log_beta", "log_alpha"):
        assert torch.equal(loaded.retention(0, x)[name], gates.retention(0, x)[name])


@pytest.mark.parametrize("scope", ["head", "global"])
@pytest.mark.parametrize("buffer", [0, 4])
def test_cache_scores_each_token_with_its_log_alpha(scope, buffer):
    """Every kept token carries the log alpha and log beta the gate gives it (prompt chunk or
    staged decode token), and the ranking uses log alpha: the same run with it zeroed keeps
    other tokens."""
    model = tiny_model("llama", seed=1)
    gates = _gates(model)
    ids = torch.randint(1, 100, (1, 40), generator=gen(503))

    def run(g):
        g.attach(model)
        cache = EvictionCache(model, "trimkv", budget=6, buffer=buffer, sinks=0,
                              budget_scope=scope)
        per_token = {i: [] for i in cache.evicted}

        def capture(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            out = g.retention(module.layer_idx, hidden)
            per_token[module.layer_idx].append(torch.stack([out["log_beta"][0],
                                                            out["log_alpha"][0]]))

        handles = [a.register_forward_pre_hook(capture, with_kwargs=True)
                   for a in attention_modules(model)]
        with torch.no_grad():
            model(ids[:, :12], cache=cache)
            for t in range(12, 40):
                model(ids[:, t : t + 1], cache=cache)
        for h in handles:
            h.remove()
        return cache, per_token

    cache, per_token = run(gates)
    assert cache.stats().evictions > 0
    for idx in cache.evicted:
        layer = cache.layers[idx]
        ref = torch.cat(per_token[idx], dim=-1)  # (2, H, 40): log beta, log alpha by position
        if scope == "head":
            pos, heads = layer.positions[0], torch.arange(ref.shape[1])[:, None]
        else:  # packed slots (1, n): each slot's head is a per-token state
            pos, heads = layer.positions[0], layer.slot_heads[0][None].long()
        want_beta, want_alpha = ref[0][heads, pos], ref[1][heads, pos]
        torch.testing.assert_close(layer.log_beta[0], want_beta, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.log_alpha[0], want_alpha, atol=1e-5, rtol=1e-5)
    kept = {i: cache.layers[i].positions.clone() for i in cache.evicted}
    with torch.no_grad():
        for i in gates.config.gated_layers:
            gates[i].alpha.weight.zero_()
    plain, _ = run(gates)
    assert any(not torch.equal(kept[i], plain.layers[i].positions) for i in cache.evicted)


def test_rank_lists_add_log_alpha_to_every_score():
    from kvbound.train.rank_loss import rank_lists

    b, h, t, d = 1, 2, 24, 4
    q, k = torch.randn(b, h, t, d, generator=gen(504)), torch.randn(b, h, t, d, generator=gen(505))
    log_beta = -torch.rand(b, h, t, generator=gen(506))
    log_alpha = torch.randn(b, h, t, generator=gen(507))
    args = (q, k, log_beta, d ** -0.5, None, 8, 4, 4, 1)
    plain = rank_lists(*args, per_layer=False)
    with_alpha = rank_lists(*args, per_layer=False, log_alpha=log_alpha)
    want = (plain.scores + log_alpha[:, :, None, :]).masked_fill(~plain.cand, float("-inf"))
    assert torch.equal(with_alpha.scores, want)


def test_training_moves_log_alpha_and_needs_the_rank_objective(tmp_path):
    from kvbound.train.trainer import TrainConfig, Trainer

    def cfg(**kw):
        return TrainConfig(**{**dict(out=str(tmp_path / "run"), memory_size=8, seq_len=48,
                                     steps=3, data="prose", seed=0, lr=1e-2, warmup_steps=1,
                                     intermediate_size=8, bias_init=3.0, save_every=3,
                                     bf16=False, train_sinks=0, objective="attention-rank",
                                     rank_horizon=16, rank_stride=8, gate_log_alpha=True), **kw})

    model = tiny_model("llama", seed=0)
    gates = Trainer(cfg(), model, ByteTokenizer(), progress=False).run()
    assert all(gates[i].alpha.weight.abs().sum() > 0 for i in gates.config.gated_layers)
    again = RetentionGates.load(tmp_path / "run")
    assert again.config.log_alpha and again.digest() == gates.digest()
    with pytest.raises(KVBoundError, match="gate_log_alpha"):
        cfg(objective="distill").validate()
    # fine-tuning plain gates with a new log alpha: step 0 is the source exactly
    plain = RetentionGates.for_model(model, intermediate_size=8, bias_init=3.0, seed=1)
    plain.save(tmp_path / "plain")
    trainer = Trainer(cfg(out=str(tmp_path / "ft"), init_gates=str(tmp_path / "plain")), model,
                      ByteTokenizer(), progress=False)
    trainer._setup()
    x = torch.randn(1, 6, model.config.hidden_size, generator=gen(508))
    out = trainer.gates.retention(0, x)
    assert torch.equal(out["log_beta"], plain(0, x)) and not out["log_alpha"].any()
    with pytest.raises(KVBoundError, match="--gate-log-alpha"):
        Trainer(cfg(out=str(tmp_path / "back"), gate_log_alpha=False,
                    init_gates=str(tmp_path / "run")), model, ByteTokenizer(),
                progress=False)._setup()
