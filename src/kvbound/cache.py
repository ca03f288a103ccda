"""EvictionCache: one memory-bounded transformers ``Cache`` for every eviction policy.

Per evicted layer the cache stores, in preallocated buffers, post-RoPE keys and values
(B, H_kv, slots, d), each token's absolute position (-1 for padding) and the policy's per-token
state (TRIM-KV: log beta). When a layer holds ``budget + buffer`` tokens and more arrive, the
policy scores the resident tokens and every (batch row, KV head) keeps its top-``budget``, in
their original order; the rest is dropped and its memory reused. ``get_seq_length()`` is the
number of tokens seen, so positions and generation stay logical.

Eviction runs in the attention module's forward pre-hook (:mod:`kvbound.hooks`), after the previous
step's attention is done and before this step's keys are appended; the same hook replaces the
layer's attention mask with one built from the cache's own per-slot validity. That keeps left-padded
batches exact and lets layers hold different token counts (PyramidKV).

Resident tokens per head never exceed ``budget + buffer`` while decoding and
``budget + buffer + chunk`` while a prompt chunk of length ``chunk`` is prefilled.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from kvbound.architectures import evicted_layers, layer_types, model_fingerprint, text_config
from kvbound.errors import KVBoundError
from kvbound.policies import Policy, get_policy


class EvictionLayer(CacheLayerMixin):
    """One layer's bounded K/V store. The policy reads its attributes when scoring."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, budget: int, buffer: int, policy: Policy, sinks: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.budget = budget
        self.buffer = buffer
        self.policy = policy
        self.sinks = sinks
        self.n = 0  # resident slots (same for every head of the layer)
        self.seen = 0  # tokens seen, padding included (= mask columns)
        self._row_seen: torch.Tensor | None = None  # (B,) real tokens per row, minus ...
        self._row_seen_add = 0  # ... tokens added to every row since (kept as an int: no op)
        self._state: dict[str, torch.Tensor] = {}  # per-token extra state, (B, H, cap)
        self._pending: dict | None = None
        self.recent_queries: torch.Tensor | None = None  # (B, Hq, w, d) post-RoPE
        self.recent_query_valid: torch.Tensor | None = None  # (B, w) bool
        self.recent_query_pos: torch.Tensor | None = None  # (B, w) absolute, -1 = padding
        # statistics
        self.peak = 0
        self.evicted_tokens = 0
        self.evictions = 0
        self.resident_sum = 0
        self.seen_sum = 0
        self.last_chunk = 1
        self.timings: dict | None = None
        self.pad_resident = False  # any padding slot resident (then masks are always built)
        self.frozen = False  # no more eviction (kvpress-style "compress the context once")
        # retention gate inputs of single-token steps, run through the gate in one batch when
        # log beta is next read (see _stage_gate_input)
        self._gate: nn.Module | None = None
        self._gate_in: torch.Tensor | None = None  # (B, buffer, hidden)
        self._gate_pending = 0  # trailing resident slots whose log beta is not computed yet
        # static decode (torch.compile): set by EvictionCache(static=True)
        self.static = False
        self.static_step = False  # this forward is a static decode step
        self._slot: torch.Tensor | None = None  # (1,) slot of the new token, shared by layers
        self._gate_slot: torch.Tensor | None = None  # (1,) its row in the staged gate inputs
        self._static_pos: torch.Tensor | None = None  # (B, 1) its position
        policy.init_layer(self)

    # ---------------------------------------------------------------- views the policies read
    @property
    def row_seen(self) -> torch.Tensor | None:
        """(B,) real (non-padding) tokens seen per batch row."""
        if self._row_seen_add:
            self._row_seen, self._row_seen_add = self._row_seen + self._row_seen_add, 0
        return self._row_seen

    @property
    def keys_(self) -> torch.Tensor:
        return self.keys[:, :, : self.n]

    @property
    def values_(self) -> torch.Tensor:
        return self.values[:, :, : self.n]

    @property
    def positions(self) -> torch.Tensor:
        """(B, H, n) absolute positions of the resident tokens, -1 for padding slots."""
        return self._pos[:, :, : self.n]

    @property
    def valid(self) -> torch.Tensor:
        return self.positions >= 0

    @property
    def log_beta(self) -> torch.Tensor:
        if "log_beta" not in self._state:
            raise KVBoundError("This policy needs retention gates: attach them with "
                              "`RetentionGates.load(...).attach(model)` before generating.")
        self.flush_gates()
        return self._state["log_beta"][:, :, : self.n]

    def state(self, name: str) -> torch.Tensor:
        return self._state[name][:, :, : self.n]

    def add_state(self, name: str) -> None:
        """Declare a per-token float32 state tensor that is compacted with the keys."""
        self._state.setdefault(name, None)  # allocated lazily with the keys

    # ---------------------------------------------------------------- CacheLayerMixin contract
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        cap = self.budget + self.buffer + max(key_states.shape[2], 1)
        self._alloc(b, h, d, value_states.shape[-1], cap)
        if self._row_seen is None:
            self._row_seen = torch.zeros(b, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def _alloc(self, b: int, h: int, dk: int, dv: int, cap: int) -> None:
        keys = torch.zeros(b, h, cap, dk, dtype=self.dtype, device=self.device)
        values = torch.zeros(b, h, cap, dv, dtype=self.dtype, device=self.device)
        pos = torch.full((b, h, cap), -1, dtype=torch.long, device=self.device)
        state = {k: torch.zeros(b, h, cap, dtype=torch.float32, device=self.device)
                 for k in self._state}
        if self.is_initialized and self.n:
            keys[:, :, : self.n] = self.keys[:, :, : self.n]
            values[:, :, : self.n] = self.values[:, :, : self.n]
            pos[:, :, : self.n] = self._pos[:, :, : self.n]
            for k in state:
                state[k][:, :, : self.n] = self._state[k][:, :, : self.n]
        self.keys, self.values, self._pos, self._state = keys, values, pos, state

    @property
    def capacity(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[2]

    def prepare(
        self,
        new_valid: torch.Tensor,
        new_pos: torch.Tensor,
        new_count: torch.Tensor,
        all_valid: bool,
        gate_input: tuple[nn.Module, torch.Tensor] | None,
        queries: torch.Tensor | None,
    ) -> None:
        """Evict if the incoming tokens would overflow budget + buffer; stash their metadata.

        ``new_pos`` (B, q) are the incoming tokens' positions (-1 for padding), ``new_count`` (B,)
        the number of real ones per row; both are computed once per forward by the cache.
        ``gate_input`` is ``(retention gate, hidden states (B, q, hidden))`` for policies that read
        log beta.
        """
        q = new_valid.shape[1]
        if self._row_seen is None:
            self._row_seen = torch.zeros(new_valid.shape[0], dtype=torch.long,
                                         device=new_valid.device)
        if not self.frozen and self.n + q > self.budget + self.buffer and self.n > self.budget:
            self.evict(self.budget)
        if gate_input is not None:
            self._gate = gate_input[0]
            self._state.setdefault("log_beta", None)
            if self.is_initialized and self._state["log_beta"] is None:
                self._state["log_beta"] = torch.zeros_like(self._pos, dtype=torch.float32)
        self._pending = {"valid": new_valid, "pos": new_pos, "count": new_count,
                         "all_valid": all_valid, "gate_input": gate_input, "queries": queries}
        if queries is not None:
            self._push_queries(queries, new_valid, new_pos)

    def _push_queries(self, queries: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor) -> None:
        w = self.policy.query_window
        if self.recent_queries is None:
            self.recent_queries = queries[:, :, -w:].detach().clone()
            self.recent_query_valid = valid[:, -w:].clone()
            self.recent_query_pos = pos[:, -w:].clone()
        else:
            self.recent_queries = torch.cat([self.recent_queries, queries.detach()], 2)[:, :, -w:]
            self.recent_query_valid = torch.cat([self.recent_query_valid, valid], 1)[:, -w:]
            self.recent_query_pos = torch.cat([self.recent_query_pos, pos], 1)[:, -w:]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.static_step:
            return self._static_update(key_states, value_states)
        if self._pending is None:
            raise KVBoundError("EvictionCache needs kvbound's hooks on the model: build the cache with "
                              "`EvictionCache(model, ...)` (it attaches them) and call that model.")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pending, self._pending = self._pending, None
        q = key_states.shape[2]
        end = self.n + q
        if end > self.capacity:
            self._alloc(*key_states.shape[:2], key_states.shape[-1], value_states.shape[-1],
                        max(end, self.budget + self.buffer + q))
        self.keys.narrow(2, self.n, q).copy_(key_states)
        self.values.narrow(2, self.n, q).copy_(value_states)
        self._pos.narrow(2, self.n, q).copy_(pending["pos"][:, None, :])
        if pending["gate_input"] is not None:
            self._stage_gate_input(pending["gate_input"][1])
        for name, tensor in self._state.items():
            if name != "log_beta":
                tensor[:, :, self.n : end] = 0.0
        self._advance(q, pending["count"], pending["all_valid"])
        self.policy.on_update(self, pending["queries"])
        return self.keys.narrow(2, 0, end), self.values.narrow(2, 0, end)

    def _advance(self, q: int, count: torch.Tensor, all_valid: bool) -> None:
        """Count ``q`` tokens appended at the end (per-row real counts ``count``) and update the
        statistics."""
        self.n += q
        self.seen += q
        if all_valid:
            self._row_seen_add += q
        else:
            self._row_seen = self.row_seen + count
            self.pad_resident = True
        self.last_chunk = q
        self.peak = max(self.peak, self.n)
        self.resident_sum += self.n
        self.seen_sum += self.seen

    def _reserve_gate_row(self, b: int, d: int, dtype: torch.dtype, device) -> int:
        """Row of the staging buffer for the next decode token's gate input (a full buffer is
        run through the gate first)."""
        rows = max(self.buffer, 1)
        buf = self._gate_in
        if buf is None or buf.shape != (b, rows, d) or buf.dtype != dtype:
            self.flush_gates()
            self._gate_in = torch.empty(b, rows, d, dtype=dtype, device=device)
        if self._gate_pending == rows:
            self.flush_gates()
        row = self._gate_pending
        self._gate_pending += 1
        return row

    def _stage_gate_input(self, hidden: torch.Tensor) -> None:
        """Log beta for the tokens being appended at slots ``n : n + q``.

        A decode step's single token is only staged: its hidden state is copied into a small
        buffer and the gate runs once over all staged tokens when log beta is next read (at the
        next eviction, every ``buffer`` steps). One batched gate call instead of ``buffer`` tiny
        ones per layer makes the gates nearly free; the result is the same log beta. Prompt
        chunks (q > 1) go through the gate at once.
        """
        b, q, d = hidden.shape
        if q == 1 and self.buffer > 0:
            row = self._reserve_gate_row(b, d, hidden.dtype, hidden.device)
            self._gate_in.narrow(1, row, 1).copy_(hidden.detach())
            return
        self.flush_gates()
        self._state["log_beta"][:, :, self.n : self.n + q] = self._gate(hidden).detach()

    def flush_gates(self) -> None:
        """Run the gate over the staged decode tokens and store their log beta."""
        p = self._gate_pending
        if not p:
            return
        t0 = time.perf_counter()
        self._gate_pending = 0
        with torch.no_grad():
            log_beta = self._gate(self._gate_in[:, :p])
        self._state["log_beta"][:, :, self.n - p : self.n] = log_beta
        if self.timings is not None:
            self.timings["scoring_inputs"] += time.perf_counter() - t0

    def evict(self, keep: int) -> None:
        """Keep the top-``keep`` slots per (row, head) by policy score, in original order."""
        n = self.n
        if n <= keep:
            return
        self.flush_gates()
        t0 = time.perf_counter()
        scores = self.policy.score(self).float()
        if torch.isnan(scores).any():
            raise KVBoundError(
                f"NaN eviction scores in layer {self.layer_idx} (policy {self.policy.name}): the "
                "gates or the model produced NaN/inf; check the gate checkpoint and the inputs."
            )
        pos = self.positions
        scores = torch.where(pos >= 0, scores, torch.full_like(scores, -math.inf))
        if self.sinks:
            scores = torch.where((pos >= 0) & (pos < self.sinks),
                                 torch.full_like(scores, math.inf), scores)
        # stable sort over reversed slots: among equal scores the most recent token wins
        order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices
        kept = (n - 1 - order[..., :keep]).sort(dim=-1).values  # (B, H, keep)
        self._compact(kept)
        if self.pad_resident:
            self.pad_resident = bool((self._pos[:, :, :keep] < 0).any())
        self.evicted_tokens += n - keep
        self.evictions += 1
        if self.timings is not None:
            self.timings["evict"] += time.perf_counter() - t0
        # after a long full prefill, give the memory back
        target = self.budget + self.buffer + self.last_chunk
        if self.capacity > 2 * target:
            b, h, _, dk = self.keys.shape
            self._alloc(b, h, dk, self.values.shape[-1], target)

    def _compact(self, kept: torch.Tensor) -> None:
        b, h, keep = kept.shape
        cap = self.capacity
        # one flat row index for every (row, head, kept slot): index_select copies whole rows,
        # about twice as fast as gather with an expanded index at these sizes
        rows = (kept + torch.arange(0, b * h * cap, cap, device=kept.device).view(b, h, 1)).view(-1)

        def take(t: torch.Tensor) -> None:
            flat = t.view(b * h * cap, -1).index_select(0, rows)
            t.narrow(2, 0, keep).copy_(flat.view(b, h, keep, *t.shape[3:]))

        take(self.keys)
        take(self.values)
        take(self._pos)
        self._pos[:, :, keep:] = -1
        for tensor in self._state.values():
            if tensor is not None:
                take(tensor)
        self.n = keep

    def attention_mask(self, new_valid: torch.Tensor, dtype: torch.dtype,
                       all_valid: bool = False) -> torch.Tensor | None:
        """Additive (B, 1, q, n + q) mask over resident + incoming tokens for this step.

        ``None`` when a single new token may see everything (no padding anywhere): attention
        then runs unmasked, as for the full cache's decode steps.
        """
        b, q = new_valid.shape
        if q == 1 and all_valid and not self.pad_resident:
            return None
        device = new_valid.device
        if self.n:
            stored = self._pos[:, 0, : self.n] >= 0  # padding slots are the same in every head
            stored = stored[:, None, None, :].expand(b, 1, q, self.n)
        else:
            stored = torch.zeros(b, 1, q, 0, dtype=torch.bool, device=device)
        causal = torch.ones(q, q, dtype=torch.bool, device=device).tril()
        new = causal[None, None] & new_valid[:, None, None, :]
        allowed = torch.cat([stored, new], dim=-1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)

    # ---------------------------------------------------------------- static decode steps
    @property
    def static_capacity(self) -> int:
        """Slots of a static layer while decoding: budget + buffer + the incoming token."""
        return self.budget + self.buffer + 1

    def begin_static_step(self, pos: torch.Tensor, count: torch.Tensor, all_valid: bool,
                          hidden: tuple[int, torch.dtype] | None) -> tuple[int, int]:
        """Eager half of a static decode step, run before the (compiled) forward.

        Evicts if needed, keeps the storage at :attr:`static_capacity` slots (same tensors from
        step to step, so compiled graphs stay valid), and advances every Python counter now, so
        the compiled half (:meth:`_static_update`, :meth:`stage_static_gate_input`) only writes
        tensors at the slot indices held in ``self._slot`` / ``self._gate_slot``. ``hidden`` is
        (hidden size, dtype) when the gate inputs are staged. Returns (slot, gate slot).
        """
        if self.n + 1 > self.budget + self.buffer and self.n > self.budget:
            self.evict(self.budget)
        cap = self.static_capacity
        if self.capacity != cap:
            b, h, _, dk = self.keys.shape
            self._alloc(b, h, dk, self.values.shape[-1], cap)
        gate_slot = 0
        if hidden is not None:
            gate_slot = self._reserve_gate_row(self.keys.shape[0], hidden[0], hidden[1],
                                               self.device)
        slot = self.n
        self._static_pos = pos
        self._advance(1, count, all_valid)
        return slot, gate_slot

    def _static_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Compiled half of a static decode step: in-place writes at a tensor index only."""
        slot = self._slot
        self.keys.index_copy_(2, slot, key_states)
        self.values.index_copy_(2, slot, value_states)
        self._pos.index_copy_(2, slot, self._static_pos[:, None, :].expand(-1, self._pos.shape[1], -1))
        return self.keys, self.values

    def stage_static_gate_input(self, hidden: torch.Tensor) -> None:
        self._gate_in.index_copy_(1, self._gate_slot, hidden.detach().to(self._gate_in.dtype))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.static and query_length == 1 and self.is_initialized:
            # a static decode step: constant while decoding (the hook supplies the real mask)
            return self.static_capacity, 0
        return self.n + query_length, self.seen - self.n

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5.18
        return -1

    # ---------------------------------------------------------------- batch manipulation
    def _rows(self, fn) -> None:
        if not self.is_initialized:
            return
        self.flush_gates()
        self.keys, self.values, self._pos = fn(self.keys), fn(self.values), fn(self._pos)
        self._state = {k: fn(v) for k, v in self._state.items() if v is not None}
        self._row_seen, self._row_seen_add = fn(self.row_seen), 0
        if self.recent_queries is not None:
            self.recent_queries = fn(self.recent_queries)
            self.recent_query_valid = fn(self.recent_query_valid)
            self.recent_query_pos = fn(self.recent_query_pos)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        raise KVBoundError("EvictionCache cannot be cropped (evicted tokens are gone); assisted "
                          "decoding and rollbacks need the full cache.")

    def reset(self) -> None:
        timings = self.timings
        self.__init__(self.layer_idx, self.budget, self.buffer, self.policy, self.sinks)
        self.timings = timings


@dataclass
class CacheStats:
    """What the cache held: per evicted layer and KV head (uniform within a layer)."""

    seen_tokens: int
    resident_tokens: dict[int, int]
    peak_tokens: dict[int, int]
    peak_tokens_per_head: int
    kv_bytes: int
    peak_kv_bytes: int
    full_kv_bytes: int
    evicted_tokens: int
    evictions: int
    kv_footprint: float
    budget: int
    buffer: int
    sinks: int
    policy: str

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


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
        Protect the first N real tokens of each row (counted inside M). ``None`` = policy default.

    Usage::

        cache = EvictionCache(model, "trimkv", budget=64, buffer=16)
        model.generate(**inputs, cache=cache, max_new_tokens=1000)
        cache.stats()
    """

    def __init__(
        self,
        model: nn.Module,
        policy: Policy | str = "trimkv",
        *,
        budget: int = 256,
        buffer: int = 32,
        sinks: int | None = None,
        static: bool = False,
        **policy_kwargs,
    ) -> None:
        from kvbound.hooks import ensure_attached

        _check_int("budget", budget, minimum=1)
        _check_int("buffer", buffer, minimum=0)
        self.policy = get_policy(policy, **policy_kwargs) if isinstance(policy, str) else policy
        sinks = min(self.policy.default_sinks, budget - 1) if sinks is None else sinks
        _check_int("sinks", sinks, minimum=0)
        if sinks >= budget:
            raise KVBoundError(f"sinks ({sinks}) must be smaller than the budget ({budget}).")
        state = ensure_attached(model)
        if self.policy.needs_gates and state.gates is None:
            raise KVBoundError(
                f"Policy {self.policy.name!r} needs retention gates: load them with "
                "`kvbound.RetentionGates.load(NAME_OR_DIR, model).attach(model)` (or train some "
                "with `kvbound train`) before building the cache."
            )
        self.budget, self.buffer, self.sinks = budget, buffer, sinks
        fp = model_fingerprint(model)
        self._head_dim, self._kv_heads = fp["head_dim"], fp["num_kv_heads"]
        self.evicted = evicted_layers(model)
        cfg = text_config(model)
        layers: list[CacheLayerMixin] = []
        for i, kind in enumerate(layer_types(model)):
            if kind == "full_attention":
                m = self.policy.layer_budget(i, self.evicted, budget)
                layers.append(EvictionLayer(i, m, buffer, self.policy, sinks))
            else:
                layers.append(DynamicSlidingWindowLayer(sliding_window=cfg.sliding_window))
        super().__init__(layers=layers)
        self.static = static
        self.static_step = False
        self._static_mask: torch.Tensor | None = None
        self._hidden_size = fp["hidden_size"]
        if static:
            self._check_static(layers)
        self._new: tuple | None = None
        self._row_seen: torch.Tensor | None = None
        #: seconds spent outside the model's own compute: gate / query recomputation
        #: ("scoring_inputs") and eviction + mask building ("cache_bookkeeping", which includes
        #: "evict").
        self.timings = {"scoring_inputs": 0.0, "cache_bookkeeping": 0.0, "evict": 0.0}
        for layer in layers:
            if isinstance(layer, EvictionLayer):
                layer.timings = self.timings

    # called by the model-level pre-hook once per forward
    def begin_forward(self, attention_mask: torch.Tensor | None, batch: int, q_len: int,
                      device: torch.device) -> None:
        """Record the incoming tokens' validity and positions (shared by every layer)."""
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask[:, -q_len:].to(device=device, dtype=torch.bool)
            all_valid = bool(valid.all())
        elif attention_mask is not None and attention_mask.dim() == 4 and q_len > 1:
            # generate() turns the 2D mask into a 4D one for compileable (static) caches; its last
            # query row (a real token under left padding) tells which new tokens are padding.
            # Its last q columns are the new tokens (see get_mask_sizes).
            last = attention_mask[:, 0, -1, -q_len:]
            valid = (last if last.dtype == torch.bool else last == 0).to(device)
            all_valid = bool(valid.all())
        else:
            valid = torch.ones(batch, q_len, dtype=torch.bool, device=device)
            all_valid = True
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
        self._new = (valid, pos, count, all_valid)
        self._new_used: set[int] = set()
        if self.static:
            t0, gates_before = time.perf_counter(), self.timings["scoring_inputs"]
            self._set_static_step(q_len == 1 and self._begin_static_step(valid, pos, count,
                                                                          all_valid))
            self.add_bookkeeping_time(t0, gates_before)

    def add_bookkeeping_time(self, t0: float, gates_before: float) -> None:
        """Charge the time since ``t0`` to cache bookkeeping, minus the staged gate runs done
        meanwhile (already charged to scoring inputs, which stood at ``gates_before``)."""
        gates = self.timings["scoring_inputs"] - gates_before
        self.timings["cache_bookkeeping"] += time.perf_counter() - t0 - gates

    # ---------------------------------------------------------------- static decode (compile)
    def _check_static(self, layers: list) -> None:
        from kvbound.policies.base import Policy

        ev = [layer for layer in layers if isinstance(layer, EvictionLayer)]
        if len(ev) != len(layers):
            raise KVBoundError("static=True does not support models with sliding-window layers "
                              "(e.g. Gemma3) yet; use the default dynamic cache.")
        if self.policy.query_window or type(self.policy).on_update is not Policy.on_update:
            raise KVBoundError(
                f"static=True needs a policy that scores from stored tokens only; "
                f"{self.policy.name!r} tracks attention. Use trimkv, streaming, knorm, keydiff or "
                "random, or the default dynamic cache."
            )
        if len({layer.budget for layer in ev}) != 1:
            raise KVBoundError("static=True needs one budget for every layer.")
        self._slot = torch.zeros(1, dtype=torch.long)
        self._gate_slot = torch.zeros(1, dtype=torch.long)
        self._seen_before = torch.zeros((), dtype=torch.long)
        for layer in ev:
            layer.static = True
            layer.is_compileable = True
            layer._slot, layer._gate_slot = self._slot, self._gate_slot

    def _begin_static_step(self, valid, pos, count, all_valid) -> bool:
        """Eager half of a static decode step for every layer, and the step's shared mask."""
        ev = [layer for layer in self.layers if isinstance(layer, EvictionLayer)]
        if not ev[0].is_initialized:
            return False  # nothing prefilled yet: run this step the dynamic way
        seen_before = ev[0].seen
        hidden = None
        if self.policy.needs_gates:
            hidden = (self._hidden_size, ev[0].keys.dtype)
        slots = {layer.begin_static_step(pos, count, all_valid, hidden) for layer in ev}
        if len(slots) != 1:  # cannot happen with one budget; guards the shared slot tensors
            raise KVBoundError(f"static layers went out of step: {sorted(slots)}")
        slot, gate_slot = slots.pop()
        device = ev[0].device
        if self._slot.device != device:
            self._slot, self._gate_slot = self._slot.to(device), self._gate_slot.to(device)
            self._seen_before = self._seen_before.to(device)
            for layer in ev:
                layer._slot, layer._gate_slot = self._slot, self._gate_slot
        self._seen_before.fill_(seen_before)
        self._slot.fill_(slot)
        self._gate_slot.fill_(gate_slot)
        rep = ev[0]
        b, cap, dtype = valid.shape[0], rep.capacity, rep.keys.dtype
        if self._static_mask is None or self._static_mask.shape != (b, 1, 1, cap) \
                or self._static_mask.dtype != dtype:
            self._static_mask = torch.zeros(b, 1, 1, cap, dtype=dtype, device=device)
        allowed = torch.zeros(b, cap, dtype=torch.bool, device=device)
        allowed[:, :slot] = rep._pos[:, 0, :slot] >= 0  # padding slots are alike in all heads
        allowed[:, slot] = valid[:, 0]
        self._static_mask.copy_(torch.where(allowed, 0.0, torch.finfo(dtype).min)[:, None, None])
        return True

    def end_forward(self) -> None:
        """Called after every forward of the model (kvbound's post-hook)."""
        if self.static_step:
            self._set_static_step(False)

    def get_seq_length(self, layer_idx: int = 0):
        """Tokens seen before the current forward. Inside a static decode step this is a 0-d
        tensor (as for transformers' StaticCache) so compiled code does not specialise on it."""
        if self.static_step:
            return self._seen_before
        return super().get_seq_length(layer_idx)

    def _set_static_step(self, on: bool) -> None:
        self.static_step = on
        for layer in self.layers:
            if isinstance(layer, EvictionLayer):
                layer.static_step = on

    def static_attention_mask(self, layer_idx: int, hidden_states: torch.Tensor,
                              gate: nn.Module | None) -> torch.Tensor:
        """Compiled half of a static decode step in the attention hook: stage the gate input,
        return the step's mask (B, 1, 1, capacity)."""
        if gate is not None:
            self.layers[layer_idx].stage_static_gate_input(hidden_states)
        return self._static_mask

    def evicts(self, layer_idx: int) -> bool:
        return isinstance(self.layers[layer_idx], EvictionLayer)

    def before_attention(
        self,
        layer_idx: int,
        hidden_states: torch.Tensor,
        gate: nn.Module | None,
        queries: torch.Tensor | None,
    ) -> torch.Tensor:
        """Evict what must go, stash the new tokens' metadata; return this layer's 4D mask.

        ``gate`` is the layer's retention gate when the policy reads log beta (run on
        ``hidden_states``, possibly later and batched)."""
        b, q = hidden_states.shape[:2]
        if self._new is None or self._new[0].shape != (b, q) or layer_idx in self._new_used:
            # called without the model-level hook (e.g. on the inner model): all tokens real
            self.begin_forward(None, b, q, hidden_states.device)
        self._new_used.add(layer_idx)
        valid, pos, count, all_valid = self._new
        layer: EvictionLayer = self.layers[layer_idx]
        layer.prepare(valid, pos, count, all_valid,
                      None if gate is None else (gate, hidden_states), queries)
        return layer.attention_mask(valid, hidden_states.dtype, all_valid)

    def compress_now(self) -> None:
        """Evict every layer down to its budget now (e.g. once after a context prefill)."""
        for layer in self.layers:
            if isinstance(layer, EvictionLayer) and layer.is_initialized:
                layer.evict(layer.budget)

    def freeze(self, frozen: bool = True) -> None:
        """Stop (or resume) evicting: the cache then grows like a full cache."""
        if frozen and self.static:
            raise KVBoundError("A static cache has a fixed size and cannot stop evicting; build "
                              "it with static=False to freeze it.")
        for layer in self.layers:
            if isinstance(layer, EvictionLayer):
                layer.frozen = frozen

    # ---------------------------------------------------------------- statistics
    def stats(self) -> CacheStats:
        ev = [layer for layer in self.layers if isinstance(layer, EvictionLayer)]
        batch = next((layer.keys.shape[0] for layer in ev if layer.is_initialized), 1)
        per_token = 2 * batch * self._kv_heads * self._head_dim
        elem = next((layer.keys.element_size() for layer in ev if layer.is_initialized), 2)
        seen = max((layer.seen for layer in ev), default=0)
        return CacheStats(
            seen_tokens=seen,
            resident_tokens={layer.layer_idx: layer.n for layer in ev},
            peak_tokens={layer.layer_idx: layer.peak for layer in ev},
            peak_tokens_per_head=max((layer.peak for layer in ev), default=0),
            kv_bytes=sum(layer.n for layer in ev) * per_token * elem,
            peak_kv_bytes=sum(layer.peak for layer in ev) * per_token * elem,
            full_kv_bytes=len(ev) * seen * per_token * elem,
            evicted_tokens=sum(layer.evicted_tokens for layer in ev),
            evictions=sum(layer.evictions for layer in ev),
            kv_footprint=(
                sum(layer.resident_sum for layer in ev) / max(sum(layer.seen_sum for layer in ev), 1)
            ),
            budget=self.budget,
            buffer=self.buffer,
            sinks=self.sinks,
            policy=self.policy.name,
        )

    def resident_positions(self, layer_idx: int) -> torch.Tensor:
        """(B, H_kv, n) absolute positions of the tokens layer ``layer_idx`` holds now."""
        return self.layers[layer_idx].positions.clone()


class TrimKVCache(EvictionCache):
    """EvictionCache with the TRIM-KV retention policy (needs gates attached to the model)."""

    def __init__(self, model: nn.Module, *, budget: int = 256, buffer: int = 32,
                 sinks: int | None = None) -> None:
        super().__init__(model, "trimkv", budget=budget, buffer=buffer, sinks=sinks)


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KVBoundError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise KVBoundError(f"{name} must be >= {minimum}, got {value}.")
