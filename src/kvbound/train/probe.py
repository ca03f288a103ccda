"""How far the training objective's student is from the teacher, on given tokens.

The gap between this number and the KL of the real bounded cache on the same tokens measures how
much of the eviction damage the training objective sees (``benchmarks/train_infer_gap.py``): the
paper's soft decay barely penalises what hard top-M eviction throws out.
"""

from __future__ import annotations

import torch

from kvbound.gates import RetentionGates
from kvbound.hooks import attach, detach


@torch.no_grad()
def student_kl(model, gates: RetentionGates, ids: torch.Tensor, *, start: int = 0,
               train_sinks: int = 0, evict: dict | None = None) -> torch.Tensor:
    """Per-row mean KL(teacher || student) over positions ``>= start``, in nats (B,).

    The student is the model with retention-gated attention, exactly as ``kvbound train`` runs
    it: ``train_sinks`` protected first tokens, and ``evict`` (``{"evict_budget": M,
    "evict_tau": tau}``) for eviction-aware attention. The model is restored afterwards."""
    from kvbound.train.attention import register_retention_attention

    prev = model.config._attn_implementation
    detach(model)
    state = attach(model, gates=gates)
    try:
        model.set_attn_implementation(register_retention_attention())
        state.mode = "teacher"
        teacher = model(input_ids=ids).logits.float().log_softmax(-1)[:, start:]
        state.mode, state.train_sinks, state.train_evict = "student", train_sinks, evict
        student = model(input_ids=ids).logits.float().log_softmax(-1)[:, start:]
    finally:
        state.mode = "inference"
        model.set_attn_implementation(prev)
        detach(model)
    return (teacher.exp() * (teacher - student)).sum(-1).mean(-1)
