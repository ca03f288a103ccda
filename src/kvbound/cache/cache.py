"""EvictionCache: one memory-bounded transformers ``Cache`` for every eviction policy.

The cache builds one :class:`~kvbound.cache.layer.EvictionLayer` per full-attention layer (a
:class:`~kvbound.cache.static.StaticEvictionLayer` with ``static=True``) and transformers'
sliding-window layer for the others. ``get_seq_length()`` is the number of tokens seen, so
positions and generation stay logical.

Per forward: the model-level pre-hook (:mod:`kvbound.hooks`) calls :meth:`EvictionCache.begin_forward`
(validity and positions of the incoming tokens, shared by all layers); each attention pre-hook
calls :meth:`EvictionCache.before_attention` (evict, stash metadata, return the layer's mask);
the attention module calls the layer's ``update`` (append); the post-hook calls
:meth:`EvictionCache.end_forward`.
"""

from __future__ import annotations

import os
import time
import warnings
import weakref

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from kvbound.architectures import evicted_layers, layer_types, model_fingerprint, text_config
from kvbound.cache import layer as eviction_layer
from kvbound.cache.layer import EvictionLayer, keep_order
from kvbound.cache.pooled import PooledEvictionLayer, check_scope
from kvbound.cache.positions import RollingPositions, check_mode, check_rolling_support
from kvbound.cache.static import StaticDecode, StaticEvictionLayer, check_static_support
from kvbound.cache.stats import CacheStats, kv_bytes, new_timings
from kvbound.errors import KVBoundError, check_int
from kvbound.policies import Policy, get_policy
from kvbound.policies.base import DEFAULT_SINKS


class EvictionCache(Cache):
    """A memory-bounded transformers Cache; the eviction rule is a :class:`Policy`.

    Parameters
    ----------
    model:
        The model this cache serves; kvbound's hooks are attached to it if needed.
    policy:
        A :class:`Policy` or a registered name (``trimkv``, ``streaming``, ``h2o``, ...).
    budget:
        M, tokens kept per (layer, KV head) after an eviction.
    buffer:
        b, tokens allowed to accumulate before the next eviction (eviction every b decode steps).
    sinks:
        Protect the first N real tokens of each row (counted inside M). ``None`` = 4
        (``DEFAULT_SINKS``, the same for every policy; ``0`` protects none).
    static:
        Fixed-shape decode steps for ``torch.compile`` (see :mod:`kvbound.cache.static`).
    positions:
        RoPE positions: ``"absolute"`` (where each token was created), ``"rolling"`` (counted
        inside the cache, StreamingLLM's remedy for runs past the model's context) or ``"auto"``
        (absolute until the run would pass ``max_position_embeddings``, then rolling). See
        :mod:`kvbound.cache.positions`.
    budget_scope:
        Who shares the budget: ``"head"`` (M tokens per layer and KV head), ``"layer"`` (the
        M x H_kv tokens of a layer shared by its heads) or ``"global"`` (M x H_kv x L shared by
        every head of every evicted layer). Same bytes in all three; the pooled scopes store the
        heads packed (:mod:`kvbound.cache.pooled`) and accept the policies whose scores are
        comparable across heads (``kvbound.cache.pooled.POOLED_POLICIES``).
    min_per_head:
        Pooled scopes: every KV head keeps at least this many tokens (its best-scored ones).

    Usage::

        cache = EvictionCache(model, "trimkv", budget=64, buffer=16)
        model.generate(**inputs, cache=cache, max_new_tokens=1000)
        cache.stats()
    """

    def __init__(self, model: nn.Module, policy: Policy | str = "trimkv", *, budget: int = 256,
                 buffer: int = 32, sinks: int | None = None, static: bool = False,
                 positions: str = "auto", budget_scope: str = "head", min_per_head: int = 0,
                 **policy_kwargs) -> None:
        from kvbound.hooks import ensure_attached

        check_int("budget", budget, minimum=1)
        check_int("buffer", buffer, minimum=0)
        policy = get_policy(policy, **policy_kwargs) if isinstance(policy, str) else policy
        self.policy = policy.fit_budget(budget)
        sinks = min(DEFAULT_SINKS, budget - 1) if sinks is None else sinks
        check_int("sinks", sinks, minimum=0)
        if sinks >= budget:
            raise KVBoundError(f"sinks ({sinks}) must be smaller than the budget ({budget}).")
        state = ensure_attached(model)
        if self.policy.needs_gates and state.gates is None:
            raise KVBoundError(
                f"Policy {self.policy.name!r} needs retention gates: load them with "
                "`kvbound.RetentionGates.load(NAME_OR_DIR, model).attach(model)` (or train some "
                "with `kvbound train`) before building the cache."
            )
        self.budget, self.buffer, self.sinks, self.static = budget, buffer, sinks, static
        self.budget_scope, self.min_per_head = budget_scope, min_per_head
        check_scope(budget_scope, min_per_head, budget, self.policy, static, positions)
        fp = model_fingerprint(model)
        self._head_dim, self._kv_heads = fp["head_dim"], fp["num_kv_heads"]
        self.evicted = evicted_layers(model)
        kinds = layer_types(model)
        budgets = {i: self.policy.layer_budget(i, self.evicted, budget)
                   for i, kind in enumerate(kinds) if kind == "full_attention"}
        self._static = StaticDecode(fp["hidden_size"]) if static else None
        if static:
            check_static_support(kinds, self.policy, set(budgets.values()))
        cfg = text_config(model)
        super().__init__(layers=self._build_layers(kinds, budgets, cfg))
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self._seen_total, self._warned = 0, False
        self.rolling = (None if budget_scope != "head" else
                        self._rolling_positions(positions, model, kinds, set(budgets.values())))
        self.positions_mode = positions
        #: position ids the model pre-hook hands to the model (rolling positions), else None
        self.position_ids: torch.Tensor | None = None
        self._new: tuple | None = None
        self._row_seen: torch.Tensor | None = None
        self._global_held: int | None = None  # global scope: slots of the fullest row
        self.timings = new_timings()
        for layer in self.eviction_layers:
            layer.timings = self.timings
            layer.rolling = self.rolling
        self._model_ref = weakref.ref(model)

    def _rolling_positions(self, mode: str, model, kinds, budgets) -> RollingPositions | None:
        if check_mode(mode) == "absolute":
            return None
        try:
            check_rolling_support(kinds, budgets, self.static)
            return RollingPositions(mode, model, self.max_positions)
        except KVBoundError:
            if mode == "auto":  # best available: absolute positions (the warning still fires)
                return None
            raise

    def _build_layers(self, kinds: list[str], budgets: dict[int, int], cfg) -> list:
        layers: list[CacheLayerMixin] = []
        for i, kind in enumerate(kinds):
            if kind != "full_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=cfg.sliding_window))
            elif self.budget_scope != "head":
                layers.append(PooledEvictionLayer(
                    i, budgets[i], self.buffer, self.policy, self.sinks, kv_heads=self._kv_heads,
                    q_heads=cfg.num_attention_heads, min_per_head=self.min_per_head,
                    coordinated=self.budget_scope == "global"))
            elif self._static is not None:
                layers.append(StaticEvictionLayer(i, budgets[i], self.buffer, self.policy,
                                                  self.sinks, self._static))
            else:
                layers.append(EvictionLayer(i, budgets[i], self.buffer, self.policy, self.sinks))
        return layers

    @property
    def eviction_layers(self) -> list[EvictionLayer]:
        return [layer for layer in self.layers if isinstance(layer, EvictionLayer)]

    @property
    def static_step(self) -> bool:
        """This forward is a static (compiled) decode step."""
        return self._static is not None and self._static.active

    def evicts(self, layer_idx: int) -> bool:
        return isinstance(self.layers[layer_idx], EvictionLayer)

    # ---------------------------------------------------------------- one forward
    def begin_forward(self, attention_mask: torch.Tensor | None, batch: int, q_len: int,
                      device: torch.device) -> None:
        """Record the incoming tokens' validity and positions (shared by every layer)."""
        valid, all_valid = _incoming_validity(attention_mask, batch, q_len, device)
        if self._row_seen is None or self._row_seen.shape[0] != batch:
            self._row_seen = torch.zeros(batch, dtype=torch.long, device=device)
        if all_valid:
            pos = self._row_seen[:, None] + torch.arange(q_len, device=device)
            count = torch.full((batch,), q_len, dtype=torch.long, device=device)
        else:
            pos = self._row_seen[:, None] + valid.long().cumsum(-1) - 1
            pos = torch.where(valid, pos, torch.full_like(pos, -1))
            count = valid.long().sum(-1)
        self._row_seen = self._row_seen + count
        self._seen_total += q_len  # padding included: an upper bound of every row's positions
        self.position_ids = None
        if self.rolling is not None and (self.rolling.active
                                         or self.rolling.should_switch(self._seen_total)):
            self._begin_rolling(valid, q_len)
        elif self.max_positions and not self._warned and self._seen_total > self.max_positions:
            self._warn_past_context()
        self._new = (valid, pos, count, all_valid)
        self._new_used: set[int] = set()
        if self._static is not None:
            t0, gates_before = time.perf_counter(), self.timings["scoring_inputs"]
            self._static.active = q_len == 1 and self._static.begin(
                self.eviction_layers, self.policy.needs_gates, valid, pos, count, all_valid)
            self.add_bookkeeping_time(t0, gates_before)

    def _begin_rolling(self, valid: torch.Tensor, q_len: int) -> None:
        """Evict now (the new tokens' positions depend on what stays), switch to rolling
        positions if ``auto`` says so, and set the position ids for this forward."""
        t0, gates_before = time.perf_counter(), self.timings["scoring_inputs"]
        layers = self.eviction_layers
        for layer in layers:
            layer.evict_if_full(q_len)
        if not self.rolling.active:
            self.rolling.switch_on(layers)
        self.position_ids = self.rolling.position_ids(layers[0], valid)
        self.add_bookkeeping_time(t0, gates_before)

    def _warn_past_context(self) -> None:
        """Warn once when a row's real tokens pass the model's trained positions."""
        if int(self._row_seen.max()) > self.max_positions:
            self._warned = True
            warnings.warn(
                f"Positions now pass the model's max_position_embeddings ({self.max_positions}): "
                "the cache stays bounded, but the model was never trained on these positions "
                "and its quality may degrade.", UserWarning, stacklevel=3)

    def before_attention(self, layer_idx: int, hidden_states: torch.Tensor,
                         gate: nn.Module | None, queries: torch.Tensor | None):
        """Evict what must go, stash the new tokens' metadata; return this layer's 4D mask.

        ``gate`` is the layer's retention gate when the policy reads log beta (run on
        ``hidden_states``, possibly later and batched)."""
        b, q = hidden_states.shape[:2]
        if self._new is None or self._new[0].shape != (b, q) or layer_idx in self._new_used:
            # called without the model-level hook (e.g. on the inner model): all tokens real
            self.begin_forward(None, b, q, hidden_states.device)
        self._new_used.add(layer_idx)
        valid, pos, count, all_valid = self._new
        if self.budget_scope == "global" and layer_idx == self.evicted[0]:
            self.evict_global_if_full(q)
        layer: EvictionLayer = self.layers[layer_idx]
        layer.prepare(valid, pos, count, all_valid, gate, hidden_states, queries)
        return layer.attention_mask(valid, hidden_states.dtype, all_valid)

    def static_attention_mask(self, layer_idx: int, hidden_states: torch.Tensor,
                              gate: nn.Module | None) -> torch.Tensor:
        """Compiled half of a static decode step in the attention hook: stage the gate input,
        return the step's mask (B, 1, 1, capacity)."""
        if gate is not None:
            self.layers[layer_idx].stage_gate_input(hidden_states)
        return self._static.mask

    def end_forward(self) -> None:
        """Called after every forward of the model (kvbound's post-hook)."""
        if self._static is not None:
            self._static.active = False

    def add_bookkeeping_time(self, t0: float, gates_before: float) -> None:
        """Charge the time since ``t0`` to cache bookkeeping, minus the staged gate runs done
        meanwhile (already charged to scoring inputs, which stood at ``gates_before``)."""
        gates = self.timings["scoring_inputs"] - gates_before
        self.timings["cache_bookkeeping"] += time.perf_counter() - t0 - gates

    def get_seq_length(self, layer_idx: int = 0):
        """Tokens seen before the current forward. Inside a static decode step this is a 0-d
        tensor (as for transformers' StaticCache) so compiled code does not specialise on it."""
        if self.static_step:
            return self._static.seen_before
        return super().get_seq_length(layer_idx)

    # ---------------------------------------------------------------- control
    def compress_now(self) -> None:
        """Evict every layer down to its budget now (e.g. once after a context prefill)."""
        if self.budget_scope == "global":
            self.evict_global(self.global_pool)
            return
        for layer in self.eviction_layers:
            if layer.is_initialized:
                layer.evict(layer.budget)

    # ---------------------------------------------------------------- global budget
    @property
    def global_pool(self) -> int:
        """Slots a global-scope eviction keeps: M x H_kv x evicted layers."""
        return sum(layer.pool for layer in self.eviction_layers)

    def evict_global_if_full(self, q: int) -> None:
        """Global scope, at the first evicted layer of a forward: evict every layer at once if
        the new tokens would pass the pool plus one buffer per head."""
        layers = self.eviction_layers
        heads = len(layers) * self._kv_heads
        if any(layer.frozen or not layer.is_initialized for layer in layers):
            self._global_held = None
            return
        # slots of the fullest row (rows of a layer are padded to the longest, so the layers'
        # sizes would make a row's evictions depend on the other rows of its batch)
        held = sum(layer.n for layer in layers) if self._global_held is None else self._global_held
        if held + q * heads > self.global_pool + self.buffer * heads and held > self.global_pool:
            self.evict_global(self.global_pool)
        if self._global_held is not None:
            self._global_held += q * heads

    def evict_global(self, keep: int) -> None:
        """Keep the top-``keep`` slots per row over every head of every evicted layer (DBTrimKV,
        arXiv 2605.09649), under each layer's rules (padding, sinks, min_per_head)."""
        layers = [layer for layer in self.eviction_layers if layer.is_initialized]
        if sum(layer.n for layer in layers) <= keep:
            return
        for layer in layers:  # before the clock: gate time is charged to scoring inputs
            layer.flush_gates()
        t0 = time.perf_counter()
        scores = torch.cat([layer.keep_scores() for layer in layers], dim=-1)  # (B, 1, N)
        kept = keep_order(scores, keep)[:, 0]  # (B, keep)
        mask = torch.zeros(scores.shape[0], scores.shape[-1], dtype=torch.bool,
                           device=scores.device).scatter_(1, kept, True)
        sizes = [layer.n for layer in layers]
        for layer, part in zip(layers, mask.split(sizes, dim=1), strict=True):
            layer.keep_mask(part)
        self._global_held = int(mask.sum(-1).max())  # one host read per eviction
        self.timings["evict"] += time.perf_counter() - t0

    def freeze(self, frozen: bool = True) -> None:
        """Stop (or resume) evicting: the cache then grows like a full cache."""
        if frozen and self.static:
            raise KVBoundError("A static cache has a fixed size and cannot stop evicting; build "
                               "it with static=False to freeze it.")
        for layer in self.eviction_layers:
            layer.frozen = frozen

    # ---------------------------------------------------------------- batch reshaping
    def _map_rows(self, fn) -> None:
        """Apply a batch reshaping to the cache-level per-row counters too (the layers do their
        own): without it a changed batch size would restart every row's positions at 0."""
        if self._row_seen is not None:
            self._row_seen = fn(self._row_seen)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_rows(lambda t: t[indices.to(t.device)])

    # ---------------------------------------------------------------- statistics
    def check_numerics(self) -> None:
        """Raise :class:`KVBoundError` if an eviction since the last check saw NaN scores. On CPU
        that raises in the step itself; on accelerators the decode step never reads a device
        value on the host, so the check waits for this call (made by :meth:`stats`)."""
        bad = [layer for layer in self.eviction_layers if layer.take_nan_flag()]  # all cleared
        if bad:
            raise bad[0].nan_error()

    def stats(self) -> CacheStats:
        self.check_numerics()
        ev = self.eviction_layers
        init = [layer for layer in ev if layer.is_initialized]
        shape = {"batch": init[0].keys.shape[0] if init else 1, "kv_heads": self._kv_heads,
                 "head_dim": self._head_dim,
                 "element_size": init[0].keys.element_size() if init else 2}
        seen = max((layer.seen for layer in ev), default=0)
        h = self._kv_heads
        return CacheStats(
            seen_tokens=seen,
            resident_tokens={layer.layer_idx: layer.n * layer.heads_per_slot // h for layer in ev},
            peak_tokens={layer.layer_idx: layer.peak * layer.heads_per_slot // h for layer in ev},
            peak_tokens_per_head=max((layer.peak_per_head for layer in ev), default=0),
            kv_bytes=kv_bytes(sum(layer.n * layer.heads_per_slot for layer in ev) // h, **shape),
            peak_kv_bytes=kv_bytes(sum(layer.peak * layer.heads_per_slot for layer in ev) // h,
                                   **shape),
            full_kv_bytes=kv_bytes(len(ev) * seen, **shape),
            evicted_tokens=sum(layer.evicted_tokens * layer.heads_per_slot for layer in ev) // h,
            evictions=sum(layer.evictions for layer in ev),
            kv_footprint=(sum(layer.resident_sum for layer in ev)
                          / max(sum(layer.seen_sum for layer in ev), 1)),
            budget=self.budget, buffer=self.buffer, sinks=self.sinks, policy=self.policy.name,
            budget_scope=self.budget_scope,
            allocated_kv_bytes=sum(layer.allocated_bytes for layer in ev),
            kept_per_head={layer.layer_idx: [round(float(c), 2) for c in
                                             layer.head_counts().float().mean(0)]
                           for layer in init},
        )

    def settings(self) -> dict:
        """The rules this cache runs under, recorded with every result: budget, buffer, sinks,
        positions, the policy with its resolved settings (e.g. SnapKV's window) and the budget
        accounting (tokens per KV head summed over the evicted layers: L x M for every policy,
        PyramidKV included, which only moves them between layers)."""
        return {"budget": self.budget, "buffer": self.buffer, "sinks": self.sinks,
                "positions": self.positions_mode, "static": self.static,
                "budget_scope": self.budget_scope, "min_per_head": self.min_per_head,
                "policy": self.policy.describe(),
                "evicted_layers": len(self.eviction_layers),
                "layer_budget_total": sum(layer.budget for layer in self.eviction_layers)}

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike, extra: dict | None = None):
        """Write this cache to one ``.safetensors`` file (atomic), to continue later with
        :meth:`load`: a bounded conversation's memory in a few MB (:mod:`kvbound.cache.persist`).
        ``extra``: JSON-able data kept in the same file (``persist.read_metadata(path)["extra"]``)."""
        from kvbound.cache.persist import save_cache

        return save_cache(self, path, extra)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module) -> EvictionCache:
        """The cache saved at ``path``, for ``model`` (the same model, and for TRIM-KV the same
        gates attached, or an error that says so); generation continues exactly."""
        from kvbound.cache.persist import load_cache

        return load_cache(path, model, "trimkv" if cls is TrimKVCache else None)

    def resident_positions(self, layer_idx: int) -> torch.Tensor:
        """(B, H_kv, n) absolute positions of the tokens layer ``layer_idx`` holds now."""
        return self.layers[layer_idx].positions.clone()


class TrimKVCache(EvictionCache):
    """EvictionCache with the TRIM-KV retention policy (arXiv 2512.03324; needs gates attached
    to the model)."""

    def __init__(self, model: nn.Module, *, budget: int = 256, buffer: int = 32,
                 sinks: int | None = None, static: bool = False, positions: str = "auto",
                 lookahead: int = 1, budget_scope: str = "head", min_per_head: int = 0,
                 attention_weight: float = 0.0) -> None:
        super().__init__(model, "trimkv", budget=budget, buffer=buffer, sinks=sinks,
                         static=static, positions=positions, lookahead=lookahead,
                         budget_scope=budget_scope, min_per_head=min_per_head,
                         attention_weight=attention_weight)


def _incoming_validity(attention_mask, batch: int, q_len: int, device):
    """(valid (B, q) bool, all valid) of a forward's new tokens, from its attention mask."""
    if attention_mask is not None and attention_mask.dim() == 2:
        valid = attention_mask[:, -q_len:].to(device=device, dtype=torch.bool)
    elif attention_mask is not None and attention_mask.dim() == 4 and q_len > 1:
        # generate() turns the 2D mask into a 4D one for compileable (static) caches; its last
        # query row (a real token under left padding) tells which new tokens are padding. Its
        # last q columns are the new tokens (see get_mask_sizes).
        last = attention_mask[:, 0, -1, -q_len:]
        valid = (last if last.dtype == torch.bool else last == 0).to(device)
    else:
        return torch.ones(batch, q_len, dtype=torch.bool, device=device), True
    if eviction_layer.defer_host_checks(valid.device):  # no host read: masks are built, padding or not
        return valid, False
    return valid, bool(valid.all())

