"""kvbound.viz: head-role classifier on synthetic data, run_viz on tiny models with crafted gates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvbound.analysis import (
    RoleThresholds,
    budget_allocation,
    classify_head,
    eviction_timeline,
    gate_log_betas,
    is_punctuation,
    median_half_life,
    timeline_from_snapshots,
)
from kvbound.cache import EvictionCache
from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGates
from kvbound.hooks import get_state
from kvbound.testing import ByteTokenizer, tiny_model
from kvbound.viz import run_viz

BUDGET, BUFFER = 16, 4


# ------------------------------------------------------------------ classifier, synthetic data
def _snaps(resident_at, start=40, end=240, step=8):
    return [(t, resident_at(t)) for t in range(start, end + 1, step)]


def test_sink_plus_recent_is_sink():
    snaps = _snaps(lambda t: [0, 1, 2, 3] + list(range(t - 28, t)))
    role = classify_head(snaps, np.zeros(240, bool))
    assert role.role == "sink"
    assert "sliding_window" in role.traits  # A-shape: sinks + a window
    assert role.first_keep == 1.0 and role.background_keep == 0.0
    assert role.window == 28


def test_recent_tokens_are_a_sliding_window_of_that_width():
    role = classify_head(_snaps(lambda t: list(range(t - 32, t))), np.zeros(240, bool))
    assert role.role == "sliding_window" and role.traits == ["sliding_window"]
    assert role.window == 32 and role.window_coverage == 1.0
    assert role.first_keep == 0.0


def test_window_with_small_holes_keeps_its_width():
    role = classify_head(_snaps(lambda t: [p for p in range(t - 48, t) if p % 3]),
                         np.zeros(240, bool))
    assert role.role == "sliding_window"
    assert 44 <= role.window <= 48


def test_punctuation_positions_make_a_gist_head():
    punct = np.zeros(240, bool)
    punct[::6] = True
    snaps = _snaps(lambda t: [p for p in range(t) if punct[p]][-24:] + [t - 2, t - 1])
    role = classify_head(snaps, punct)
    assert role.role == "gist"
    assert role.punct_share > 0.8 and role.punct_ratio > 4
    assert "sliding_window" not in role.traits


def test_scattered_old_tokens_are_content():
    rng = np.random.default_rng(0)

    def resident(t):
        old = rng.choice(np.arange(4, t - 8), size=24, replace=False)
        return sorted(old.tolist()) + list(range(t - 8, t))

    role = classify_head(_snaps(resident), np.zeros(240, bool))
    assert role.role == "content" and role.traits == []


def test_no_eviction_is_undetermined():
    role = classify_head([(8, list(range(8))), (16, list(range(16)))], np.zeros(16, bool))
    assert role.role == "undetermined" and role.snapshots == 0


def test_protected_sinks_are_not_a_sink_role():
    snaps = _snaps(lambda t: [0, 1, 2, 3] + list(range(t - 28, t)))
    role = classify_head(snaps, np.zeros(240, bool), sinks=4)
    assert role.role == "sliding_window" and role.first_keep is None


def test_thresholds_are_configurable():
    snaps = _snaps(lambda t: [0] + list(range(t - 28, t)))
    assert classify_head(snaps, np.zeros(240, bool)).role == "sink"
    strict = RoleThresholds(first_tokens=4, sink_keep=1.01)
    assert classify_head(snaps, np.zeros(240, bool), thresholds=strict).role == "sliding_window"


def test_padding_and_tensor_inputs():
    snaps = [(t, torch.tensor([-1, -1] + list(range(t - 20, t)))) for t in range(40, 120, 8)]
    role = classify_head(snaps, torch.zeros(120, dtype=torch.bool))
    assert role.role == "sliding_window" and role.window == 20


# ------------------------------------------------------------------ run_viz on a tiny model
TEXT = " ".join(f"word{i % 7}x{'.' if i % 3 == 0 else ','}" for i in range(30))


def _crafted(model, tok, ids):
    """Layer 0: head 0 keeps punctuation (gist), head 1 keeps token id 1 (sink).
    Layer 1: constant log beta (pure recency, a sliding window)."""
    gates = RetentionGates.for_model(model)
    used = torch.tensor(sorted(set(ids)))
    emb = model.model.layers[0].input_layernorm(model.model.embed_tokens.weight[used])
    w1 = torch.cat([torch.eye(64), -torch.eye(64)])
    feats = torch.nn.functional.silu(emb @ w1.T)
    target = torch.stack([torch.where(is_punctuation(tok, used), 12.0, -3.0),
                          torch.where(used == 1, 12.0, -3.0)], 1)
    sol = torch.linalg.lstsq(feats, target).solution
    assert (feats @ sol - target).abs().max() < 0.5
    g0, g1 = gates[0], gates[1]
    g0.linear1.weight.copy_(w1)
    g0.linear1.bias.zero_()
    g0.linear2.weight.copy_(sol.T)
    g0.bias.zero_()
    g1.linear2.weight.zero_()
    return gates


@pytest.fixture(scope="module")
def viz(tmp_path_factory):
    model = tiny_model("llama", num_layers=2)
    tok = ByteTokenizer()
    ids = [1, 1, 1, 1] + tok.encode(TEXT)
    with torch.no_grad():
        gates = _crafted(model, tok, ids)
    out = tmp_path_factory.mktemp("viz")
    res = run_viz(model, tok, gates, ids=torch.tensor(ids), out=out, budget=BUDGET, buffer=BUFFER)
    return model, tok, gates, torch.tensor(ids), out, res


def test_files_written(viz):
    *_, out, res = viz
    names = {p.name for p in out.iterdir()}
    assert {"half_life.png", "retention.html", "survivors.html", "head_roles.json",
            "head_roles.md"} <= names
    for l, h in res["heads"]:
        assert f"timeline_L{l}_H{h}.png" in names
    assert all(p.exists() and p.stat().st_size > 0 for p in res["files"].values())


def test_budget_allocation_picture(viz):
    """Where a shared budget went: per scope, tokens per (layer, head), within the pool."""
    model, _, gates, ids, out, res = viz
    assert (out / "budget_allocation.png").stat().st_size > 0
    heads = model.config.num_key_value_heads
    for scope, held in res["budget_allocation"].items():
        assert held.shape == (2, heads)
        assert int(held.sum()) <= (BUDGET + BUFFER) * heads * 2, scope
        if scope == "layer":
            assert (held.sum(1) <= (BUDGET + BUFFER) * heads).all()
    from kvbound.hooks import attached

    with torch.no_grad(), attached(model, gates):
        again = budget_allocation(model, ids[None], budget=BUDGET, buffer=BUFFER, scope="global")
    assert torch.equal(again, res["budget_allocation"]["global"])


def test_half_life_matrix_matches_gates(viz):
    model, _, gates, ids, _, res = viz
    assert res["half_life"].shape == (2, 2) and res["layers"] == [0, 1]
    with torch.no_grad():
        expected = median_half_life(gate_log_betas(model, gates, ids[None]))
    assert torch.allclose(res["half_life"], expected)


def test_crafted_heads_get_their_roles(viz):
    *_, res = viz
    roles = {(r.layer, r.head): r.role for r in res["head_roles"]}
    assert roles == {(0, 0): "gist", (0, 1): "sink", (1, 0): "sliding_window",
                     (1, 1): "sliding_window"}
    summary = res["roles"]
    assert summary["counts"]["gist"] == 1 and summary["counts"]["sliding_window"] == 2
    assert [row["layer"] for row in summary["layers"]] == [0, 1]
    # default picks: depth spread + an example of every role found; html head = the gist head
    assert {(0, 1), (0, 0)} <= set(res["heads"]) and any(l == 1 for l, _ in res["heads"])
    assert res["html_head"] == (0, 0)
    window = next(r for r in res["head_roles"] if (r.layer, r.head) == (1, 0)).window
    assert BUDGET <= window <= BUDGET + BUFFER


def test_timeline_rows_are_consistent(viz):
    model, _, gates, ids, _, res = viz
    total = ids.numel()
    for grid in res["timelines"].values():
        assert grid.shape == (total, total)
        assert grid.diagonal().all()
        assert not grid.triu(1).any()
        assert int(grid.sum(1).max()) <= BUDGET + BUFFER
    # identical to analysis.eviction_timeline fed in chunks of the buffer
    gates.attach(model)
    try:
        cache = EvictionCache(model, "trimkv", budget=BUDGET, buffer=BUFFER, sinks=0)
        ref = eviction_timeline(model, ids, cache, 0, 1, step=BUFFER)
    finally:
        gates.detach(model)
    assert torch.equal(ref, timeline_from_snapshots(res["snapshots"][0], 1, total))
    # the sink head holds positions 0-3 on every row once it has seen them
    assert res["timelines"][(0, 1)][4:, :4].all()


def test_survivors_and_json(viz):
    model, _, _, ids, out, res = viz
    assert get_state(model) is None  # hooks removed again
    surv = res["survivors"]
    assert surv.shape == (ids.numel(),)
    assert int(surv[-1]) == 4  # the newest token is in every (layer, head)
    assert int(surv.sum()) == sum(int((p >= 0).sum()) for p in res["final_resident"].values())
    assert int(surv[:4].min()) >= 1  # the sink head keeps them
    data = json.loads((out / "head_roles.json").read_text())
    assert data["budget"] == BUDGET and len(data["heads"]) == 4
    assert data["thresholds"]["first_tokens"] == RoleThresholds().first_tokens
    md = (out / "head_roles.md").read_text()
    assert "gist" in md and "| 0 | 1 | sink |" in md


def test_text_generation_html_escaping(tmp_path):
    model = tiny_model("qwen3", num_layers=3, seed=1)
    tok = ByteTokenizer()
    gates = RetentionGates.for_model(model, init_std=0.5, bias_init=2.0).attach(model)
    text = "Hello <script>alert('x')</script> & bye. " * 2
    res = run_viz(model, tok, None, text=text, out=tmp_path, budget=8, buffer=4,
                  heads=[(1, 1)], html_head=(2, 0), max_new_tokens=4)
    assert get_state(model) is not None and get_state(model).gates is gates  # left attached
    n_text = len(tok.encode(text))
    assert res["n_text"] == n_text and 0 < res["n_generated"] <= 4
    total = n_text + res["n_generated"]
    assert res["ids"].shape == (total,) and res["timelines"][(1, 1)].shape == (total, total)
    assert res["half_life"].shape == (3, 2)
    assert sorted(p.name for p in tmp_path.glob("timeline_*")) == ["timeline_L1_H1.png"]
    for name in ("retention.html", "survivors.html"):
        page = (tmp_path / name).read_text()
        assert "<script" not in page.lower()
        assert "&lt;" in page and "&amp;" in page
        assert "legend" in page and "[generated continuation]" in page
    gates.detach(model)


def test_bad_arguments(tmp_path):
    model = tiny_model("llama", num_layers=2)
    tok = ByteTokenizer()
    gates = RetentionGates.for_model(model)
    with pytest.raises(KVBoundError, match='Give exactly one'):
        run_viz(model, tok, gates, text="ab", ids=torch.tensor([3, 4]), out=tmp_path)
    with pytest.raises(KVBoundError, match=r'\(layer, head\) \(5,'):
        run_viz(model, tok, gates, text="abc", out=tmp_path, heads=[(5, 0)])
    with pytest.raises(KVBoundError, match=r'\(layer, head\) \(0,'):
        run_viz(model, tok, gates, text="abc", out=tmp_path, heads=[(0, 2)])
    with pytest.raises(KVBoundError, match='sinks must be'):
        run_viz(model, tok, gates, text="abc", out=tmp_path, budget=4, sinks=4)
    assert get_state(model) is None


def test_short_text_is_undetermined_with_warning(tmp_path):
    model = tiny_model("llama", num_layers=2)
    tok = ByteTokenizer()
    gates = RetentionGates.for_model(model)
    res = run_viz(model, tok, gates, text="short text", out=tmp_path, budget=64, buffer=16)
    assert res["roles"]["counts"]["undetermined"] == 4 and res["roles"]["warnings"]
    assert (tmp_path / "half_life.png").exists()


def test_gate_log_betas_feeds_positions_to_gates_that_read_them():
    """Gates with a position input (the shipped ones) get each token's position: the captured
    log beta equals the gate run on the layer input with positions 0..T-1."""
    model = tiny_model("llama", seed=0)
    gates = RetentionGates.for_model(model, bias_init=2.0, init_std=0.5, seed=0,
                                     position_input=True)
    for gate in gates.gates.values():
        torch.nn.init.normal_(gate.position.weight, std=2.0,
                              generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(2))
    got = gate_log_betas(model, gates, ids)
    hidden = {}
    hooks = [attn.register_forward_pre_hook(
        lambda m, a, kw, i=i: hidden.__setitem__(i, kw["hidden_states"]), with_kwargs=True)
        for i, attn in enumerate(layer.self_attn for layer in model.model.layers)]
    with torch.no_grad():
        model(ids)
        want = {i: gates(i, h, torch.arange(12)[None])[0] for i, h in hidden.items()}
    for h in hooks:
        h.remove()
    for i in want:
        torch.testing.assert_close(got[i], want[i].float())
