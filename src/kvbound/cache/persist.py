"""Save and reload a bounded cache: a conversation's memory outlives one ``generate`` call.

A bounded cache holds at most ``budget + buffer`` tokens per layer and KV head however long the
conversation, so its whole state is a few MB: small enough to write after every turn and load in
constant time. One ``.safetensors`` file holds every tensor (resident keys and values, positions,
the policy's per-token state, the query window of attention-based policies, sliding-window layers)
and, in its header metadata, a JSON record of the rest: the cache's settings (policy with its
resolved settings, budget, buffer, sinks, positions), counters, the model's fingerprint (its
architecture plus a hash of a sample of its weights) and the gates' digest. Loading refuses
another model or other gates, with a message that says what to do. The write is atomic (temporary
file, fsync, rename): a kill leaves the previous file intact.

Continuing from a loaded cache computes exactly what an uninterrupted run does (tested, greedy).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvbound.errors import KVBoundError

FORMAT = "kvbound-cache"
VERSION = 1
#: EvictionLayer counters saved as plain numbers
_COUNTERS = ("n", "seen", "peak", "evicted_tokens", "evictions", "resident_sum", "seen_sum",
             "last_chunk", "pad_resident", "frozen")


def weights_fingerprint(model: torch.nn.Module, sample: int = 256) -> str:
    """Hash of the first ``sample`` values of every parameter (names, shapes, values): cheap, and
    different for another checkpoint of the same architecture."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)[:sample].to("cpu", torch.float32)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(flat.numpy().tobytes())
    return h.hexdigest()[:16]


def _identity(model) -> dict:
    from kvbound.architectures import model_fingerprint

    return {**model_fingerprint(model), "weights": weights_fingerprint(model)}


def _gates_ref(model) -> str | None:
    from kvbound.hooks import get_state

    state = get_state(model)
    gates = getattr(state, "gates", None)
    return gates.ref() if gates is not None else None


def save_cache(cache, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``cache`` (an :class:`~kvbound.cache.EvictionCache`) to ``path`` atomically, with
    ``extra`` (JSON-able, e.g. a conversation's state) in the same file."""
    from safetensors.torch import save

    from kvbound.cache.layer import EvictionLayer
    from kvbound.io import atomic_write_bytes

    if cache.static:
        raise KVBoundError("A static (compiled) cache cannot be saved yet; build it with "
                           "static=False to save it.")
    if cache.budget_scope != "head":
        raise KVBoundError(f"A cache with budget_scope {cache.budget_scope!r} cannot be saved "
                           "yet; build it with budget_scope='head' to save it.")
    model = cache._model_ref()
    if model is None:
        raise KVBoundError("The model this cache was built for is gone; save the cache while "
                           "the model is alive.")
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, EvictionLayer):
            rec = {"kind": "evict", **{k: _plain(getattr(layer, k)) for k in _COUNTERS},
                   "initialized": bool(layer.is_initialized)}
            if layer.is_initialized:
                layer.flush_gates()  # staged decode tokens get their log beta now (same values)
                n = layer.n
                rec["dtype"] = str(layer.dtype).removeprefix("torch.")
                tensors[f"{i}.keys"] = layer.keys[:, :, :n]
                tensors[f"{i}.values"] = layer.values[:, :, :n]
                tensors[f"{i}.pos"] = layer._pos[:, :, :n]
                rec["state"] = sorted(k for k, v in layer._state.items() if v is not None)
                for k in rec["state"]:
                    tensors[f"{i}.state.{k}"] = layer._state[k][:, :, :n]
                rec["state_declared"] = sorted(layer._state)
            if layer.row_seen is not None:
                tensors[f"{i}.row_seen"] = layer.row_seen
            win = layer.queries
            if win.queries is not None:
                tensors[f"{i}.q.queries"], tensors[f"{i}.q.valid"] = win.queries, win.valid
                tensors[f"{i}.q.pos"] = win.pos
        elif isinstance(layer, DynamicSlidingWindowLayer):
            rec = {"kind": "sliding", "initialized": bool(layer.is_initialized),
                   "cumulative_length": int(layer.cumulative_length)}
            if layer.is_initialized:
                tensors[f"{i}.keys"], tensors[f"{i}.values"] = layer.keys, layer.values
        else:
            raise KVBoundError(f"Layer {i} ({type(layer).__name__}) cannot be saved.")
        layers.append(rec)
    if cache._row_seen is not None:
        tensors["row_seen"] = cache._row_seen
    meta = {
        "format": FORMAT, "version": VERSION, "settings": cache.settings(),
        "model": _identity(model),
        "gates": _gates_ref(model) if cache.policy.needs_gates else None, "layers": layers,
        "seen_total": cache._seen_total, "warned": cache._warned,
        "rolling_active": bool(cache.rolling is not None and cache.rolling.active),
        "extra": extra or {},
    }
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                metadata={"kvbound": json.dumps(meta)})
    return atomic_write_bytes(path, data)


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON record of a saved cache (settings, model, counters) without loading tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise KVBoundError(f"No saved cache at {path}.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("kvbound", "null"))
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same answer
        raise KVBoundError(f"{path} is not a readable saved cache ({exc}).") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise KVBoundError(f"{path} is a safetensors file but not a kvbound cache.")
    if meta.get("version") != VERSION:
        raise KVBoundError(f"{path} was written by another version of kvbound (cache format "
                           f"{meta.get('version')}, this one reads {VERSION}).")
    return meta


def load_cache(path: str | os.PathLike, model, policy_name: str | None = None):
    """The EvictionCache saved at ``path``, rebuilt for ``model``, ready to continue
    (``policy_name``: refuse a cache of another policy)."""
    from safetensors.torch import load_file

    from kvbound.cache.cache import EvictionCache
    from kvbound.cache.layer import EvictionLayer

    meta = read_metadata(path)
    mine = _identity(model)
    if meta["model"] != mine:
        diff = {k: (meta["model"].get(k), mine.get(k)) for k in mine
                if meta["model"].get(k) != mine.get(k)}
        raise KVBoundError(f"{path} was saved for another model (saved vs this one: {diff}); "
                           "load it with the model it was built with.")
    s = meta["settings"]
    policy = dict(s["policy"])
    name = policy.pop("policy")
    if policy_name is not None and name != policy_name:
        raise KVBoundError(f"{path} holds a {name!r} cache, not {policy_name!r}: load it with "
                           "EvictionCache.load.")
    if meta["gates"] is not None and _gates_ref(model) != meta["gates"]:
        raise KVBoundError(f"{path} was built with gates {meta['gates']}, the model has "
                           f"{_gates_ref(model) or 'none'} attached: attach those gates "
                           "(RetentionGates.load(...).attach(model)) before loading.")
    cache = EvictionCache(model, name, budget=s["budget"], buffer=s["buffer"], sinks=s["sinks"],
                positions=s["positions"], **policy)
    tensors = load_file(str(path))
    device = next(model.parameters()).device
    t = {k: v.to(device) for k, v in tensors.items()}
    for i, (layer, rec) in enumerate(zip(cache.layers, meta["layers"], strict=True)):
        if isinstance(layer, EvictionLayer) != (rec["kind"] == "evict"):
            raise KVBoundError(f"{path}: layer {i} has another kind than this model's.")
        if rec["kind"] == "evict":
            _restore_evict_layer(layer, rec, t, i)
        elif rec["initialized"]:
            layer.lazy_initialization(t[f"{i}.keys"], t[f"{i}.values"])
            layer.keys, layer.values = t[f"{i}.keys"], t[f"{i}.values"]
            layer.cumulative_length = rec["cumulative_length"]
    cache._row_seen = t.get("row_seen")
    cache._seen_total, cache._warned = meta["seen_total"], meta["warned"]
    if meta["rolling_active"]:
        if cache.rolling is None:
            raise KVBoundError(f"{path} uses rolling positions, which this model does not allow.")
        cache.rolling.active = True
    return cache


def _restore_evict_layer(layer, rec: dict, t: dict, i: int) -> None:
    if f"{i}.row_seen" in t:
        layer._row_seen, layer._row_seen_add = t[f"{i}.row_seen"], 0
    if rec["initialized"]:
        keys, values, pos = t[f"{i}.keys"], t[f"{i}.values"], t[f"{i}.pos"]
        b, h, n, dk = keys.shape
        dtype = getattr(torch, rec["dtype"])
        layer.dtype, layer.device = dtype, keys.device
        layer._state = {k: None for k in rec["state_declared"]}
        layer._alloc(b, h, dk, values.shape[-1], layer.budget + layer.buffer + max(n, 1))
        layer.is_initialized = True
        layer.keys[:, :, :n], layer.values[:, :, :n], layer._pos[:, :, :n] = keys, values, pos
        for k in rec["state"]:
            layer._state[k][:, :, :n] = t[f"{i}.state.{k}"]
    for k in _COUNTERS:
        setattr(layer, k, rec[k])
    if f"{i}.q.queries" in t:
        win = layer.queries
        win.queries, win.valid, win.pos = t[f"{i}.q.queries"], t[f"{i}.q.valid"], t[f"{i}.q.pos"]


def _plain(value):
    return value.item() if isinstance(value, torch.Tensor) else value
