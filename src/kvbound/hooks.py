"""Forward pre-hooks that wire kvbound into a stock transformers model (no forked model files).

* On the model: record which incoming tokens are padding (from the 2D attention mask) so the
  cache can keep exact per-row validity.
* On every attention module: compute the layer's log beta with its retention gate (when gates are
  attached), and, when the call carries an :class:`~kvbound.cache.EvictionCache`, evict what must go
  and replace the attention mask with the cache's own. In gate training the log beta is handed to
  the retention-gated attention function instead (:mod:`kvbound.train.gating`).

Hooks call the cache, never the reverse. :func:`attached` scopes them: ``with attached(model,
gates): ...`` detaches on exit.

With any other cache (or none) the hooks change nothing. :func:`detach` removes every hook and
attribute, so the model computes exactly as before.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from kvbound.architectures import attention_modules, query_states
from kvbound.train import gating

STATE_ATTR = "_kvbound_hooks"
LOG_BETA_ATTR = gating.LOG_BETA_ATTR


@dataclass
class HookState:
    gates: nn.Module | None = None
    #: "inference"; "student" (training: hand log beta to the attention function);
    #: "teacher" (training: plain attention, no gate); "rank" (training: plain attention, the
    #: gate's ranking scored against it, :mod:`kvbound.train.rank_loss`)
    mode: str = "inference"
    #: in training, protect the first N tokens from decay (beta = 1), matching sink protection
    train_sinks: int = 0
    train_evict: dict | None = None
    #: "rank" mode (training): the attention-rank objective's settings
    train_rank: dict | None = None
    handles: list = field(default_factory=list)


def get_state(model: nn.Module) -> HookState | None:
    return model.__dict__.get(STATE_ATTR)


def ensure_attached(model: nn.Module) -> HookState:
    state = get_state(model)
    return state if state is not None else attach(model)


def attach(model: nn.Module, gates: nn.Module | None = None) -> HookState:
    """Install the hooks (idempotent); ``gates`` replaces any gates attached before."""
    state = get_state(model)
    if state is not None:
        if gates is not None:
            state.gates = gates
        return state
    modules = attention_modules(model)  # raises for unsupported architectures
    state = HookState(gates=gates)
    state.handles.append(
        model.register_forward_pre_hook(_model_pre_hook(state), with_kwargs=True)
    )
    state.handles.append(
        model.register_forward_hook(_model_post_hook, with_kwargs=True, always_call=True)
    )
    for attn in modules:
        state.handles.append(
            attn.register_forward_pre_hook(_attention_pre_hook(state), with_kwargs=True)
        )
    model.__dict__[STATE_ATTR] = state
    return state


@contextmanager
def attached(model: nn.Module, gates: nn.Module | None = None):
    """``with attached(model, gates): ...`` - the hooks (and gates) for the block only; on exit
    the model computes exactly as before (hooks that were there before stay)."""
    had = get_state(model) is not None
    previous = get_state(model).gates if had else None
    state = attach(model, gates)
    try:
        yield state
    finally:
        if had:
            state.gates = previous
        else:
            detach(model)


def detach(model: nn.Module) -> None:
    """Remove every kvbound hook and attribute from ``model``."""
    state = model.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    for attn in attention_modules(model):
        gating.clear(attn)


def _cache_of(kwargs: dict):
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _model_pre_hook(state: HookState):
    # always eager, also inside torch.compile: it evicts and advances Python counters
    @torch.compiler.disable
    def hook(module, args, kwargs):
        from kvbound.cache import EvictionCache

        cache = _cache_of(kwargs)
        if not isinstance(cache, EvictionCache):
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        cache.begin_forward(mask, ref.shape[0], ref.shape[1], ref.device)
        if cache.position_ids is not None:  # rolling positions (kvbound.cache.positions)
            kwargs["position_ids"] = cache.position_ids
            return args, kwargs
        return None

    return hook


@torch.compiler.disable
def _model_post_hook(module, args, kwargs, output):
    from kvbound.cache import EvictionCache

    cache = _cache_of(kwargs)
    if isinstance(cache, EvictionCache):
        cache.end_forward()


def _attention_pre_hook(state: HookState):
    def hook(module, args, kwargs):
        from kvbound.cache import EvictionCache

        hidden = kwargs.get("hidden_states", args[0] if args else None)
        layer_idx = module.layer_idx
        gates = state.gates
        if state.mode != "inference":
            gating.hand_off(module, state.mode, gates, hidden, state.train_sinks,
                            state.train_evict, state.train_rank)
            return None
        has_gate = gates is not None and layer_idx in gates
        cache = _cache_of(kwargs)
        if not isinstance(cache, EvictionCache) or not cache.evicts(layer_idx):
            return None
        # the cache runs the gate itself (batched over decode steps, see EvictionLayer)
        gate = gates[layer_idx] if has_gate and cache.policy.needs_gates else None
        if cache.static_step:  # traceable: tensor writes at fixed slots, a prepared mask
            kwargs["attention_mask"] = cache.static_attention_mask(layer_idx, hidden, gate)
        else:
            kwargs["attention_mask"] = _dynamic_step(module, cache, hidden, gate, kwargs)
        return args, kwargs

    return hook


# eager even inside torch.compile (e.g. transformers compiling a chunked prefill): Python
# bookkeeping that changes every call would otherwise be traced and recompiled
@torch.compiler.disable
def _dynamic_step(module, cache, hidden, gate, kwargs):
    """Evict, stash the new tokens' metadata and return the layer's attention mask."""
    t0 = time.perf_counter()
    queries = None
    if cache.policy.query_window:
        queries = query_states(module, hidden, kwargs["position_embeddings"])
    t1, gates_before = time.perf_counter(), cache.timings["scoring_inputs"]
    mask = cache.before_attention(module.layer_idx, hidden, gate, queries)
    cache.add_bookkeeping_time(t1, gates_before)  # staged gates may run in there
    cache.timings["scoring_inputs"] += t1 - t0
    return mask

