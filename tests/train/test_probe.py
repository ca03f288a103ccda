"""student_kl: the training objective's distance to the teacher, as train_infer_gap reports it."""

from __future__ import annotations

import torch

from kvbound.gates import RetentionGates
from kvbound.hooks import get_state
from kvbound.testing import tiny_model
from kvbound.train.probe import student_kl
from tests.rng import gen


def test_student_kl_orders_the_objectives_and_restores_the_model():
    torch.set_num_threads(1)
    model = tiny_model("llama", seed=0)
    ids = torch.randint(3, 100, (2, 40), generator=gen(71))
    with torch.no_grad():
        before = model(ids).logits
    keep_all = RetentionGates.for_model(model, intermediate_size=8, bias_init=30.0, seed=0)
    assert student_kl(model, keep_all, ids).abs().max() < 1e-4  # beta = 1: the teacher
    gates = RetentionGates.for_model(model, intermediate_size=8, bias_init=3.0, seed=0)
    soft = student_kl(model, gates, ids, start=4)
    evict = student_kl(model, gates, ids, start=4, evict={"evict_budget": 4, "evict_tau": 0.01})
    assert soft.shape == (2,) and (soft > 0).all()
    assert (evict > soft).all()  # top-4 eviction hurts more than the soft decay
    assert get_state(model) is None and model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
