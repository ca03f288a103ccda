"""The attention-rank objective (kvbound.train.rank_loss) and its trainer mode."""

from __future__ import annotations

import json

import pytest
import torch

from kvbound.errors import KVBoundError
from kvbound.gates import RetentionGates
from kvbound.hooks import get_state
from kvbound.testing import ByteTokenizer, tiny_model
from kvbound.train.rank_loss import attention_rank_loss, future_attention
from kvbound.train.trainer import TrainConfig, Trainer
from tests.rng import gen


def _qk(b=2, hq=4, hkv=2, t=14, d=8, seed=0):
    g = gen(seed)
    return torch.randn(b, hq, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)


def test_future_attention_is_the_sum_of_later_queries_attention():
    """F_t(i) = sum over queries t..t+W-1 of the group-mean attention to key i (loop reference),
    padding keys and padding queries excluded."""
    q, k = _qk()
    b, _, t, _ = q.shape
    keep = torch.ones(t, t, dtype=torch.bool).tril().expand(b, 1, t, t).clone()
    keep[1, :, :, :3] = False  # row 1: three left-padding keys
    keep[1, :, :3, :] = False  # ... whose queries attend nowhere
    times, horizon = torch.tensor([4, 7, 12]), 5
    got = future_attention(q, k, 0.3, keep, times, horizon)
    torch.testing.assert_close(got, _loop_reference(q, k, keep, times, horizon, 1))
    assert torch.all(got[1, :, :, :3] == 0)
    every2 = future_attention(q, k, 0.3, keep, times, horizon, query_step=2)
    torch.testing.assert_close(every2, _loop_reference(q, k, keep, times, horizon, 2))


def _loop_reference(q, k, keep, times, horizon, step):
    b, hq, t, _ = q.shape
    hkv = k.shape[1]
    ref = torch.zeros(b, hkv, len(times), t)
    for bi in range(b):
        for h in range(hkv):
            for ti, t0 in enumerate(times.tolist()):
                for tq in range(t0, min(t0 + horizon, t)):
                    if tq % step:
                        continue
                    row = keep[bi, 0, tq]
                    if not row.any():
                        continue
                    for hh in range(h * hq // hkv, (h + 1) * hq // hkv):
                        s = (q[bi, hh, tq] @ k[bi, h].T) * 0.3
                        p = torch.where(row, s, float("-inf")).softmax(-1)
                        ref[bi, h, ti] += p * step / (hq // hkv)
    return ref


def test_rank_loss_fits_the_ranking_and_ignores_padding():
    """Fitting a free log beta lowers the loss and its listwise KL (>= 0); padding keys get no
    gradient and do not change the loss."""
    q, k = _qk(t=24)
    keep = torch.ones(24, 24, dtype=torch.bool).tril().expand(2, 1, 24, 24).clone()
    keep[1, :, :, :4] = False
    raw = torch.zeros(2, 2, 24, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=0.1)
    first = None
    for _ in range(60):
        log_beta = -torch.nn.functional.softplus(raw) - 1e-3
        loss, kl = attention_rank_loss(q, k, log_beta, 0.3, keep, horizon=6, stride=3, start=3)
        first = (float(loss.detach()), kl) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert kl >= -1e-5
    assert float(loss.detach()) < first[0] - 0.05 and kl < first[1] * 0.8
    assert torch.all(raw.grad[1, :, :4] == 0) and raw.grad[1, :, 4:].abs().sum() > 0
    lb = -torch.rand(2, 2, 24, generator=gen(3))
    other = lb.clone()
    other[1, :, :4] = -5.0
    a = attention_rank_loss(q, k, lb, 0.3, keep, horizon=6, stride=3, start=3)
    c = attention_rank_loss(q, k, other, 0.3, keep, horizon=6, stride=3, start=3)
    assert torch.equal(a[0], c[0])


def test_rank_loss_prefers_the_ranking_of_the_model_attention():
    """A log beta that keeps the key every later query attends to scores a lower loss than one
    that ranks it last (the decision the cache makes)."""
    t, d = 20, 4
    k = torch.zeros(1, 1, t, d)
    q = torch.zeros(1, 1, t, d)
    k[0, 0, 5, 0] = 10.0  # key 5 is the one every query looks at
    q[0, 0, :, 0] = 1.0
    keeps = torch.full((1, 1, t), -0.5)
    keeps[..., 5] = -1e-4
    drops = torch.full((1, 1, t), -1e-4)
    drops[..., 5] = -0.5
    good = attention_rank_loss(q, k, keeps, 1.0, horizon=4, stride=2, start=6)
    bad = attention_rank_loss(q, k, drops, 1.0, horizon=4, stride=2, start=6)
    assert good[0] < bad[0] and good[1] < bad[1]
    with pytest.raises(KVBoundError, match="horizon, stride, start and query_step"):
        attention_rank_loss(q, k, keeps, horizon=0)
    with pytest.raises(KVBoundError, match="too short"):
        attention_rank_loss(q, k, keeps, start=40)


def _cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), memory_size=8, seq_len=48, steps=3, data="prose",
                seed=0, lr=1e-2, warmup_steps=1, intermediate_size=8, bias_init=3.0,
                save_every=2, bf16=False, objective="attention-rank", rank_horizon=8,
                rank_stride=4, train_sinks=0)
    base.update(kw)
    return TrainConfig(**base)


def test_attention_rank_trains_only_the_gates(tmp_path):
    """--objective attention-rank: one decoder pass a step, the gates move, the model is
    restored bit for bit, the log carries the listwise KL and the rank loss, resume is exact."""
    model = tiny_model("llama", seed=0)
    before = {n: v.clone() for n, v in model.state_dict().items()}
    gates = Trainer(_cfg(tmp_path), model, ByteTokenizer(), progress=False).run()
    for n, v in model.state_dict().items():
        assert torch.equal(v, before[n]), n
    assert get_state(model) is None and model.config._attn_implementation == "sdpa"
    fresh = RetentionGates.for_model(model, intermediate_size=8, bias_init=3.0, seed=0)
    assert all(not torch.equal(a, b) for a, b in zip(gates.parameters(), fresh.parameters(), strict=False))
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]
    assert all(r["rank"] > 0 and r["kl"] >= 0 and "ntp" not in r for r in log)
    saved = RetentionGates.load(tmp_path / "run", model)
    assert saved.metadata.training["config"]["objective"] == "attention-rank"
    part = tmp_path / "part"
    Trainer(_cfg(part), model, ByteTokenizer(), progress=False).run(stop_after=2)
    resumed = Trainer(_cfg(part, extra={"resume": True}), model, ByteTokenizer(),
                      progress=False).run()
    assert resumed.digest() == gates.digest()


def test_rank_loss_is_fp32_under_bf16_autocast(tmp_path, monkeypatch):
    """On a CPU with native bf16 the trainer runs under bf16 autocast: the objective must still
    compute in fp32 (a bf16 matmul cannot hold the finite mask fill) and give the fp32 value; a
    trainer step with bf16 on runs."""
    q, k = _qk(t=20)
    log_beta = torch.full((2, 2, 20), -0.05, requires_grad=True)
    ref = attention_rank_loss(q, k, log_beta, horizon=6, stride=3, start=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention_rank_loss(q.bfloat16(), k.bfloat16(), log_beta, horizon=6, stride=3,
                                  start=4)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], atol=2e-2, rtol=2e-2)
    got[0].backward()
    assert log_beta.grad is not None and torch.isfinite(log_beta.grad).all()
    import kvbound.train.trainer as trainer_mod
    monkeypatch.setattr(trainer_mod, "_bf16_ok", lambda device: True)
    trainer = Trainer(_cfg(tmp_path, steps=1, bf16=True), tiny_model("llama", seed=0),
                      ByteTokenizer(), progress=False)
    assert trainer.use_bf16
    trainer.run()
    log = json.loads((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()[0])
    assert log["rank"] > 0 and log["kl"] >= 0


def test_attention_rank_config_is_checked(tmp_path):
    with pytest.raises(KVBoundError, match="objective must be"):
        _cfg(tmp_path, objective="nope").validate()
    with pytest.raises(KVBoundError, match="attention-rank training does not run"):
        _cfg(tmp_path, evict_aware=True).validate()
    with pytest.raises(KVBoundError, match="rank_horizon"):
        _cfg(tmp_path, rank_horizon=0).validate()
    with pytest.raises(KVBoundError, match="seq_len must be > 16"):
        _cfg(tmp_path, seq_len=16).validate()


def test_layer_scope_ranks_all_heads_keys_in_one_list():
    """scope="layer": at each decision time one ListNet list over every (KV head, key) pair, the
    target the heads' future attention side by side (loop reference); a head whose keys the model
    attends to more sharply must score its best key above another head's weaker key, which the
    per-head lists never ask."""
    q, k = _qk(t=16)
    b, hq, t, _ = q.shape
    hkv = k.shape[1]
    keep = torch.ones(t, t, dtype=torch.bool).tril().expand(b, 1, t, t).clone()
    keep[1, :, :, :2] = False
    keep[1, :, :2, :] = False
    log_beta = -torch.rand(b, hkv, t, generator=gen(5)) - 1e-3
    horizon, stride, start = 5, 3, 4
    loss, kl = attention_rank_loss(q, k, log_beta, 0.3, keep, horizon=horizon, stride=stride,
                                   start=start, query_step=1, scope="layer")
    times = torch.arange(start, t, stride)
    flow = _loop_reference(q, k, keep, times, horizon, 1)
    ces, kls = [], []
    for bi in range(b):
        for ti, t0 in enumerate(times.tolist()):
            if not keep[bi, 0, t0, t0]:
                continue
            keys = [(h, i) for h in range(hkv) for i in range(t0) if keep[bi, 0, t0, i]]
            target = torch.tensor([float(flow[bi, h, ti, i]) for h, i in keys])
            if target.sum() <= 0:
                continue
            target = target / target.sum()
            scores = torch.stack([(t0 - i) * log_beta[bi, h, i] for h, i in keys])
            logp = scores.log_softmax(0)
            ces.append(-(target * logp).sum())
            kls.append(float((target * (target.clamp_min(1e-30).log() - logp)).sum()))
    torch.testing.assert_close(loss, torch.stack(ces).mean())
    assert kl == pytest.approx(sum(kls) / len(kls), abs=1e-5)
    head = attention_rank_loss(q, k, log_beta, 0.3, keep, horizon=horizon, stride=stride,
                               start=start, query_step=1)
    assert abs(float(head[0]) - float(loss)) > 1e-3  # not the per-head lists
    with pytest.raises(KVBoundError, match="scope must be"):
        attention_rank_loss(q, k, log_beta, scope="global")


def test_attention_rank_layer_scope_reaches_the_trainer(tmp_path, monkeypatch):
    """rank_scope in TrainConfig (checked), handed to the loss, recorded with the gates (the CLI
    option: tests/cli/test_commands.py)."""
    import kvbound.train.rank_loss as rank_loss

    seen = []
    original = rank_loss.attention_rank_loss

    def spy(*args, **kw):
        seen.append(kw.get("scope"))
        return original(*args, **kw)
    monkeypatch.setattr(rank_loss, "attention_rank_loss", spy)
    model = tiny_model("llama", seed=0)
    Trainer(_cfg(tmp_path, rank_scope="layer", steps=1), model, ByteTokenizer(),
            progress=False).run()
    assert seen and set(seen) == {"layer"}
    saved = RetentionGates.load(tmp_path / "run", model)
    assert saved.metadata.training["config"]["rank_scope"] == "layer"
    with pytest.raises(KVBoundError, match="rank_scope must be"):
        _cfg(tmp_path, rank_scope="global").validate()


def test_model_scope_joins_every_layers_lists_into_one():
    """scope="model": each layer returns its per-layer lists; joined, one ListNet list per
    decision time spans every layer's (head, key) pairs, equal to the loss of the per-layer
    lists concatenated by hand, and it differs from averaging the layers' own losses."""
    from kvbound.train.rank_loss import RankLists, join_lists, listnet

    kw = dict(horizon=5, stride=3, start=4, query_step=1)
    layers = []
    for seed in (0, 1):
        q, k = _qk(t=16, seed=seed)
        lb = -torch.rand(2, 2, 16, generator=gen(10 + seed)) - 1e-3
        layers.append((q, k, lb))
    parts = [attention_rank_loss(q, k, lb, 0.3, scope="model", **kw) for q, k, lb in layers]
    assert all(isinstance(p, RankLists) for p in parts)
    loss, kl = listnet(join_lists(parts))
    flow = torch.cat([p.flow for p in parts], -1)
    scores = torch.cat([p.scores for p in parts], -1)
    target = flow / flow.sum(-1, keepdim=True)
    ref = -(target * scores.log_softmax(-1).nan_to_num(0.0, neginf=0.0)).sum(-1)
    torch.testing.assert_close(loss, ref.mean())
    assert kl >= 0
    per_layer = [attention_rank_loss(q, k, lb, 0.3, scope="layer", **kw) for q, k, lb in layers]
    assert abs(float(loss) - float(sum(p[0] for p in per_layer) / 2)) > 1e-3
    lb = layers[0][2].clone().requires_grad_(True)
    joined = listnet(join_lists([attention_rank_loss(*layers[0][:2], lb, 0.3, scope="model",
                                                     **kw), parts[1]]))[0]
    joined.backward()
    assert lb.grad.abs().sum() > 0


def test_attention_rank_model_scope_trains(tmp_path):
    """rank_scope="model" in the trainer: one list over the gated layers, the gates move."""
    model = tiny_model("llama", seed=0)
    gates = Trainer(_cfg(tmp_path, rank_scope="model", steps=2), model, ByteTokenizer(),
                    progress=False).run()
    fresh = RetentionGates.for_model(model, intermediate_size=8, bias_init=3.0, seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(gates.parameters(), fresh.parameters(),
                                                       strict=True))
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["rank"] > 0 and r["kl"] >= 0 for r in log)
    assert gates.metadata.training["config"]["rank_scope"] == "model"


def test_topm_lost_mass_is_the_attention_a_cut_throws_away():
    """Hard value: the target share of the keys below the top-k cut; the soft loss tends to it
    as tau -> 0; its gradient raises the high-attention key below the cut, lowers the
    low-attention one at the cut, and sums to 0 (shifting every score changes nothing); lists
    with <= k candidates lose nothing."""
    from kvbound.train.rank_loss import RankLists, topm_lost_mass

    flow = torch.tensor([[[[5.0, 1.0, 3.0, 0.5, 0.5, 0.0]]]])  # (B, 1, 1 time, K=6)
    scores = torch.tensor([[[[4.0, 3.0, 1.0, 2.0, 0.0, float("-inf")]]]], requires_grad=True)
    cand = torch.isfinite(scores.detach())
    lists = RankLists(flow, scores, cand, torch.ones(1, 1, 1))
    loss, hard = topm_lost_mass(lists, keep=3, tau=1e-3)
    # kept: keys 0, 1, 3 (scores 4, 3, 2); lost: keys 2 and 4 -> (3 + 0.5) / 10
    assert hard == pytest.approx(0.35) and float(loss) == pytest.approx(0.35, abs=1e-3)
    loss, _ = topm_lost_mass(lists, keep=3, tau=1.0)
    loss.backward()
    grad = scores.grad[0, 0, 0]
    assert torch.isfinite(grad).all() and float(grad.sum()) == pytest.approx(0.0, abs=1e-6)
    assert grad[2] < 0 < grad[3]  # descent raises key 2 (3/10 of the attention), lowers key 3
    none, hard_none = topm_lost_mass(lists, keep=5)
    assert float(none) == 0.0 and hard_none == 0.0


def test_topm_term_trains_with_the_model_wide_list(tmp_path):
    from kvbound.errors import KVBoundError
    from kvbound.testing import ByteTokenizer, tiny_model
    from kvbound.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(out=str(tmp_path / "run"), memory_size=4, seq_len=48, steps=2,
                      data="prose", seed=0, lr=1e-2, warmup_steps=1, intermediate_size=8,
                      bias_init=3.0, save_every=2, bf16=False, train_sinks=0,
                      objective="attention-rank", rank_horizon=16, rank_stride=8,
                      rank_scope="model", rank_topm_weight=5.0)
    Trainer(cfg, tiny_model("llama", seed=0), ByteTokenizer(), progress=False).run()
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(0 < r["topm_lost_hard"] < 1 and r["topm_lost"] > 0 for r in log)
    with pytest.raises(KVBoundError, match="needs evict_aware or rank_topm_weight"):
        TrainConfig(**{**cfg.__dict__, "rank_topm_weight": 0.0, "evict_budgets": [4]}).validate()


def test_lists_flag_returns_each_scopes_lists():
    """lists=True: the layer's RankLists, one per KV head (scope head: (B, H_kv, times, T)) or
    one per layer (scope layer: the heads side by side), whose ListNet is the loss the same call
    returns without the flag."""
    from kvbound.train.rank_loss import RankLists, listnet

    q, k = _qk(t=16, seed=3)
    lb = -torch.rand(2, 2, 16, generator=gen(4)) - 1e-3
    kw = dict(horizon=5, stride=3, start=4, query_step=1)
    for scope, shape in (("head", (2, 2, 4, 16)), ("layer", (2, 1, 4, 32))):
        lists = attention_rank_loss(q, k, lb, 0.3, scope=scope, lists=True, **kw)
        assert isinstance(lists, RankLists) and lists.scores.shape == shape
        loss, kl = attention_rank_loss(q, k, lb, 0.3, scope=scope, **kw)
        torch.testing.assert_close(listnet(lists)[0], loss)
        assert listnet(lists)[1] == pytest.approx(kl)


def test_topm_term_per_head_cuts_each_head_at_m_and_cycles_budgets(tmp_path):
    """rank_scope="head" with the top-M term: each KV head's list is cut at M (the cache's
    per-head budget), so on the same first step a larger M loses less attention and the share
    differs from the model-wide cut at M x heads x layers; evict_budgets cycles M one per step,
    and the cycle's first step is the single-budget run's."""
    def first_steps(name, **kw):
        cfg = _cfg(tmp_path / name, rank_topm_weight=5.0, rank_topm_sequential=True, **kw)
        Trainer(cfg, tiny_model("llama", seed=0), ByteTokenizer(), progress=False).run()
        path = tmp_path / name / "run" / "train_log.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()]

    m4, m12 = first_steps("m4", memory_size=4, steps=1), first_steps("m12", memory_size=12, steps=1)
    assert 0 < m12[0]["topm_lost_hard"] < m4[0]["topm_lost_hard"] < 1
    model_wide = first_steps("model", memory_size=4, steps=1, rank_scope="model")
    assert model_wide[0]["topm_lost_hard"] != pytest.approx(m4[0]["topm_lost_hard"])
    cyc = first_steps("cyc", steps=3, evict_budgets=[4, 12])
    assert [r["budget"] for r in cyc] == [4, 12, 4]
    assert cyc[0]["topm_lost_hard"] == m4[0]["topm_lost_hard"] and cyc[0]["loss"] == m4[0]["loss"]


def test_sequential_cut_sees_only_the_keys_that_survived():
    """A key cut at the first decision is gone at the second even if its score rises there:
    survivors() drops it, and the sequential top-M term counts its attention as lost with no
    gradient to it (the one-shot term would 'keep' it at the second decision)."""
    from kvbound.train.rank_loss import RankLists, survivors, topm_lost_mass

    inf = float("-inf")
    # decision 0: keys 0-2 are candidates; decision 1: keys 0-3
    scores = torch.tensor([[[[3.0, 1.0, 2.0, inf], [1.0, 5.0, 2.0, 4.0]]]], requires_grad=True)
    cand = torch.isfinite(scores.detach())
    alive = survivors(scores, cand, keep=2)
    assert alive[0, 0, 0].tolist() == [True, True, True, False]
    assert alive[0, 0, 1].tolist() == [True, False, True, True]  # key 1 was cut at decision 0
    flow = torch.tensor([[[[1.0, 1.0, 1.0, 0.0], [1.0, 2.0, 1.0, 1.0]]]])
    lists = RankLists(flow, scores, cand, torch.ones(1, 1, 2))
    _, one_shot = topm_lost_mass(lists, keep=2, tau=1e-3)
    loss, seq = topm_lost_mass(lists, keep=2, tau=1e-3, sequential=True)
    # one-shot cut at decision 1 keeps keys 1 and 3 (loses 2/5); sequentially key 1 is gone and
    # the cut keeps 3 and 2 of the survivors, losing key 0 (1/5); key 1's 2/5 is not in the term
    assert one_shot == pytest.approx((1 / 3 + 2 / 5) / 2) and seq == pytest.approx((1 / 3 + 1 / 5) / 2)
    loss.backward()
    assert scores.grad[0, 0, 1, 1] == 0


def test_relative_topm_temperature_ignores_the_score_scale():
    """With a relative temperature, scaling every score by 10 leaves the soft loss unchanged;
    with an absolute one it moves (towards the hard cut's value), though the cut did not."""
    from kvbound.train.rank_loss import RankLists, topm_lost_mass

    flow = torch.tensor([[[[5.0, 1.0, 3.0, 0.5, 0.5]]]])
    scores = torch.tensor([[[[4.0, 3.0, 1.0, 2.0, 0.0]]]])
    cand = torch.ones_like(scores, dtype=torch.bool)
    w = torch.ones(1, 1, 1)

    def soft(s, relative):
        return float(topm_lost_mass(RankLists(flow, s, cand, w), 3, 0.5, relative=relative)[0])

    assert soft(10 * scores, True) == pytest.approx(soft(scores, True), rel=1e-5)
    assert abs(soft(10 * scores, False) - soft(scores, False)) > 0.05
