"""Future-attention tables for the eviction oracle (:mod:`kvbound.policies.oracle`).

One forward pass of the full model over the windows; a capturing attention function (SDPA for
the output, so the pass computes exactly what the model does) reduces each evicted layer's
attention to the future attention mass of every key at decision times ``0, stride, 2 stride, ...``
with :func:`kvbound.train.rank_loss.future_attention`, the attention-rank objective's target.
Memory: (B, H_kv, T / stride + 1, T) fp32 per evicted layer (SmolLM2, 1K tokens, stride 16:
24 MB per window); the (T x T) attention of one layer is transient.
"""

from __future__ import annotations

import torch

from kvbound.architectures import attention_modules, evicted_layers
from kvbound.errors import KVBoundError, check_int
from kvbound.policies.oracle import FutureAttentionOracle

CAPTURE_NAME = "kvbound_capture"
_SINK_ATTR = "_kvbound_capture"


def _capture_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     **kwargs):
    """transformers attention function: SDPA, and hand (query, key) to the module's sink."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sink = module.__dict__.get(_SINK_ATTR)
    if sink is not None:
        sink(query, key, scaling if scaling is not None else query.shape[-1] ** -0.5,
             attention_mask)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def _register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_NAME, _capture_forward)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    return CAPTURE_NAME


@torch.no_grad()
def future_attention_tables(model, ids: torch.Tensor, *, stride: int = 16,
                            horizon: int | None = None) -> dict[int, torch.Tensor]:
    """``{layer: (B, H_kv, J, T)}``: for every evicted layer, the future attention mass of each
    key at the decision times ``j * stride`` (``j < J = ceil(T / stride) + 1``) over the next
    ``horizon`` queries (all later ones when ``None``), from the full model's attention on
    ``ids`` (B, T) (rows without padding: the tables index keys by position)."""
    from kvbound.train.rank_loss import _keep_mask, future_attention

    check_int("stride", stride, minimum=1)
    if horizon is not None:
        check_int("horizon", horizon, minimum=1)
    b, t = ids.shape
    w = t if horizon is None else horizon
    times = torch.arange(0, t + stride, stride, device=ids.device).clamp(max=t)
    keep_layers = set(evicted_layers(model))
    tables: dict[int, torch.Tensor] = {}
    modules = attention_modules(model)

    def sink_for(idx):
        def sink(query, key, scaling, mask):
            keep = _keep_mask(mask, b, t, query.device)
            tables[idx] = future_attention(query, key, scaling, keep, times, w, 1)
        return sink

    prev = model.config._attn_implementation
    try:
        for module in modules:
            if module.layer_idx in keep_layers:
                module.__dict__[_SINK_ATTR] = sink_for(module.layer_idx)
        model.set_attn_implementation(_register())
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(prev)
        for module in modules:
            module.__dict__.pop(_SINK_ATTR, None)
    missing = keep_layers - set(tables)
    if missing:
        raise KVBoundError(f"No attention was captured for layers {sorted(missing)}: the model's "
                           "attention modules do not call transformers' attention interface.")
    return tables


def oracle_policy(model, ids: torch.Tensor, *, stride: int = 16,
                  horizon: int | None = None) -> FutureAttentionOracle:
    """The oracle policy for a cache that will be fed exactly ``ids``."""
    return FutureAttentionOracle(tables=future_attention_tables(model, ids, stride=stride,
                                                                horizon=horizon),
                                 stride=stride, horizon=horizon)
