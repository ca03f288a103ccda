"""EvictionLayer: one layer's bounded K/V store (a transformers ``CacheLayerMixin``).

Storage is preallocated: post-RoPE keys and values (B, H_kv, slots, d), each token's absolute
position (-1 for padding) and the policy's per-token state (TRIM-KV: log beta). When the layer
holds ``budget + buffer`` tokens and more arrive, the policy scores the resident tokens and every
(batch row, KV head) keeps its top-``budget`` in original order; the rest is dropped and its
memory reused. Resident tokens per head never exceed ``budget + buffer`` while decoding and
``budget + buffer + chunk`` while a prompt chunk of length ``chunk`` is prefilled.

The hot path of one decode step: :meth:`prepare` (evict if full) from the attention pre-hook, then
:meth:`update` (append) from the attention module itself, then :meth:`attention_mask`.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin

from kvbound.cache.gate_staging import GateStaging
from kvbound.errors import KVBoundError
from kvbound.gates import GATE_OUTPUTS
from kvbound.policies import Policy

#: relative tolerance under which two eviction scores count as tied (see :func:`keep_order`)
TIE_RTOL = 1e-5


def defer_host_checks(device: torch.device) -> bool:
    """Whether checks that read a device value on the host (NaN scores) wait until
    :meth:`EvictionCache.check_numerics` instead of running in the decode step: on accelerators,
    where reading one would stall the stream and break CUDA-graph capture; on CPU the read is free."""
    return device.type != "cpu"


class QueryWindow:
    """The last ``w`` post-RoPE queries of a layer, for attention-based policies."""

    def __init__(self, w: int) -> None:
        self.w = w
        self.queries: torch.Tensor | None = None  # (B, Hq, w, d)
        self.valid: torch.Tensor | None = None  # (B, w) bool
        self.pos: torch.Tensor | None = None  # (B, w) absolute positions, -1 = padding

    def push(self, queries: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor) -> None:
        w = self.w
        if self.queries is None:
            self.queries = queries[:, :, -w:].detach().clone()
            self.valid, self.pos = valid[:, -w:].clone(), pos[:, -w:].clone()
        else:
            self.queries = torch.cat([self.queries, queries.detach()], 2)[:, :, -w:]
            self.valid = torch.cat([self.valid, valid], 1)[:, -w:]
            self.pos = torch.cat([self.pos, pos], 1)[:, -w:]

    def map_rows(self, fn) -> None:
        if self.queries is not None:
            self.queries, self.valid, self.pos = fn(self.queries), fn(self.valid), fn(self.pos)


def keep_order(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Slots (..., keep) of the top-``keep`` scores per (row, head), in original order.

    Scores that differ by at most :data:`TIE_RTOL` relative (chained through the sorted scores)
    are ties, and among ties the most recent token wins. Last-bit differences between kernels
    (another batch shape, another CPU's GEMM, 1 or 2 threads) therefore cannot change which
    tokens are kept. ``+inf`` (protected) and ``-inf`` (padding) tie only among themselves.
    """
    n = scores.shape[-1]
    vals, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    gap = vals[..., :-1] - vals[..., 1:]  # >= 0; NaN where both are the same infinity
    scale = torch.maximum(vals[..., :-1].abs(), vals[..., 1:].abs())
    tie = torch.isnan(gap) | (torch.isfinite(gap) & (gap <= TIE_RTOL * scale))
    group = torch.cat([torch.zeros_like(tie[..., :1], dtype=torch.long),
                       (~tie).long().cumsum(-1)], dim=-1)  # 0 = best group
    slot_group = torch.empty_like(group).scatter_(-1, order, group)
    recency = torch.arange(n - 1, -1, -1, device=scores.device)  # 0 = most recent slot
    rank = slot_group * n + recency
    kept = torch.topk(rank, keep, dim=-1, largest=False, sorted=False).indices
    return kept.sort(dim=-1).values


def step_mask(stored: torch.Tensor, new_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, q, n + q) mask: resident slots ``stored`` (B, n) that are real (padding
    slots are the same in every head), then causal attention among the ``q`` new tokens, of
    which ``new_valid`` (B, q) are real."""
    b, q = new_valid.shape
    stored = stored[:, None, None, :].expand(b, 1, q, stored.shape[-1])
    causal = torch.ones(q, q, dtype=torch.bool, device=new_valid.device).tril()
    allowed = torch.cat([stored, causal[None, None] & new_valid[:, None, None, :]], dim=-1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=new_valid.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


class _BatchOps:
    """Beam search and batch reshaping for an EvictionLayer (every per-row tensor at once)."""

    def _rows(self, fn) -> None:
        if not self.is_initialized:
            return
        self.flush_gates()
        self.keys, self.values, self._pos = fn(self.keys), fn(self.values), fn(self._pos)
        self._state = {k: fn(v) for k, v in self._state.items() if v is not None}
        self._row_seen, self._row_seen_add = fn(self.row_seen), 0
        self.queries.map_rows(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))


class EvictionLayer(_BatchOps, CacheLayerMixin):
    """One layer's bounded K/V store. Policies read the documented view in
    :class:`kvbound.policies.base.LayerView`."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, budget: int, buffer: int, policy: Policy, sinks: int):
        super().__init__()
        self.layer_idx, self.budget, self.buffer = layer_idx, budget, buffer
        self.policy, self.sinks = policy, sinks
        self.n = 0  # resident slots (same for every head of the layer)
        self.seen = 0  # tokens seen, padding included (= mask columns)
        self._row_seen: torch.Tensor | None = None  # (B,) real tokens per row, minus ...
        self._row_seen_add = 0  # ... tokens added to every row since (kept as an int: no op)
        self._state: dict[str, torch.Tensor] = {}  # per-token extra state, (B, H, cap)
        self._pending: dict | None = None
        self.queries = QueryWindow(policy.query_window)
        self.gates = GateStaging(buffer)
        self.peak = self.evicted_tokens = self.evictions = 0
        #: device flag: some eviction saw NaN scores (accelerators; see defer_host_checks)
        self._nan_seen: torch.Tensor | None = None
        self.resident_sum = self.seen_sum = 0
        self.last_chunk = 1
        self.timings: dict | None = None
        self.pad_resident = False  # any padding slot resident (then masks are always built)
        self.frozen = False  # no more eviction (kvpress-style "compress the context once")
        self.rolling = None  # RollingPositions of the cache (keys re-rotated on compaction)
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

    #: KV heads one slot index stands for (every head holds slot i; pooled layers: one)
    @property
    def heads_per_slot(self) -> int:
        return self.keys.shape[1] if self.is_initialized else 0

    @property
    def peak_per_head(self) -> int:
        """Most tokens any KV head held (every head holds ``n`` here)."""
        return self.peak

    @property
    def allocated_bytes(self) -> int:
        """Bytes of this layer's key and value tensors (capacity, not only resident slots)."""
        if not self.is_initialized:
            return 0
        return (self.keys.numel() * self.keys.element_size()
                + self.values.numel() * self.values.element_size())

    def head_counts(self) -> torch.Tensor:
        """(B, H) real tokens held per row and KV head."""
        return (self.positions >= 0).sum(-1)

    @property
    def log_beta(self) -> torch.Tensor:
        if "log_beta" not in self._state:
            raise KVBoundError("This policy needs retention gates: attach them with "
                               "`RetentionGates.load(...).attach(model)` before generating.")
        self.flush_gates()
        return self._state["log_beta"][:, :, : self.n]

    @property
    def log_alpha(self) -> torch.Tensor | None:
        """(B, H, n) log initial importance from gates that give one, else ``None``."""
        if "log_alpha" not in self._state:
            return None
        self.flush_gates()
        return self._state["log_alpha"][:, :, : self.n]

    def state(self, name: str) -> torch.Tensor:
        return self._state[name][:, :, : self.n]

    def add_state(self, name: str) -> None:
        """Declare a per-token float32 state tensor that is compacted with the keys."""
        self._state.setdefault(name, None)  # allocated lazily with the keys

    # ---------------------------------------------------------------- storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self._alloc(b, h, d, value_states.shape[-1],
                    self.budget + self.buffer + max(key_states.shape[2], 1))
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
            n = self.n
            keys[:, :, :n], values[:, :, :n] = self.keys[:, :, :n], self.values[:, :, :n]
            pos[:, :, :n] = self._pos[:, :, :n]
            for k in state:
                state[k][:, :, :n] = self._state[k][:, :, :n]
        self.keys, self.values, self._pos, self._state = keys, values, pos, state

    def _realloc(self, cap: int) -> None:
        b, h, _, dk = self.keys.shape
        self._alloc(b, h, dk, self.values.shape[-1], cap)

    @property
    def capacity(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[2]

    # ---------------------------------------------------------------- one forward
    def prepare(self, new_valid: torch.Tensor, new_pos: torch.Tensor, new_count: torch.Tensor,
                all_valid: bool, gate: nn.Module | None, hidden: torch.Tensor,
                queries: torch.Tensor | None) -> None:
        """Evict if the incoming tokens would overflow budget + buffer; stash their metadata.

        ``new_pos`` (B, q) are the incoming tokens' positions (-1 for padding), ``new_count`` (B,)
        the number of real ones per row; both are computed once per forward by the cache.
        ``gate`` is the layer's retention gate (run on ``hidden`` (B, q, hidden)) for policies
        that read log beta, else ``None``.
        """
        q = new_valid.shape[1]
        if self._row_seen is None:
            self._row_seen = torch.zeros(new_valid.shape[0], dtype=torch.long,
                                         device=new_valid.device)
        self.evict_if_full(q)
        if gate is not None:
            self.gates.gate = gate
            for name in self.gates.outputs:
                self._state.setdefault(name, None)
                if self.is_initialized and self._state[name] is None:
                    self._state[name] = torch.zeros_like(self._pos, dtype=torch.float32)
        self._pending = {"valid": new_valid, "pos": new_pos, "count": new_count,
                         "all_valid": all_valid, "hidden": hidden if gate is not None else None,
                         "queries": queries}
        if queries is not None:
            self.queries.push(queries, new_valid, new_pos)

    def evict_if_full(self, q: int) -> None:
        """Evict down to the budget if ``q`` incoming tokens would overflow budget + buffer."""
        if not self.frozen and self.n + q > self.budget + self.buffer and self.n > self.budget:
            self.evict(self.budget)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append this forward's keys/values; return the resident + new ones."""
        if self._pending is None:
            raise KVBoundError("EvictionCache needs kvbound's hooks on the model: build the cache "
                               "with `EvictionCache(model, ...)` (it attaches them) and call "
                               "that model.")
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
        if pending["hidden"] is not None:
            self._gate_log_beta(pending["hidden"])
        for name, tensor in self._state.items():
            if name not in GATE_OUTPUTS:
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

    def _gate_log_beta(self, hidden: torch.Tensor) -> None:
        """Log beta (and log alpha) for the tokens being appended at slots ``n : n + q``: a
        decode token is staged (:class:`GateStaging`), a prompt chunk goes through the gate at
        once."""
        if hidden.shape[1] == 1 and self.buffer > 0:
            self.gates.stage(hidden, self.flush_gates)
            return
        self.flush_gates()
        q = hidden.shape[1]
        with torch.no_grad():
            outputs = self.gates.apply(hidden, self._pos[:, 0, self.n : self.n + q])
        for name, value in outputs.items():
            self._store_chunk_output(name, value)

    def _store_chunk_output(self, name: str, value: torch.Tensor) -> None:
        """Gate output ``name`` (log beta, log alpha), (B, H, q), of the chunk being appended at
        slot ``n``."""
        self._state[name][:, :, self.n : self.n + value.shape[-1]] = value

    def flush_gates(self) -> None:
        """Run the gate over the staged decode tokens and store its outputs."""
        p = self.gates.pending
        if not p:
            return
        t0 = time.perf_counter()
        self._store_staged_outputs(p)
        if self.timings is not None:
            self.timings["scoring_inputs"] += time.perf_counter() - t0

    def _store_staged_outputs(self, p: int) -> None:
        """The gate's outputs for the ``p`` staged tokens: the trailing ``p`` slots."""
        n = self.n
        for name, value in self.gates.run(self._pos[:, 0, n - p : n]).items():
            self._state[name][:, :, n - p : n] = value

    # ---------------------------------------------------------------- eviction
    def evict(self, keep: int) -> None:
        """Keep the top-``keep`` slots per (row, head) by policy score, in original order."""
        n = self.n
        if n <= keep:
            return
        self.flush_gates()  # before the clock: gate time is charged to scoring inputs
        t0 = time.perf_counter()
        pos = self.positions
        kept = keep_order(self.keep_scores(), keep)
        rolling = self.rolling is not None and self.rolling.active
        old_pos = pos.clone() if rolling else None  # pos is a view that _compact overwrites
        self._compact(kept)
        if rolling:
            self.rolling.after_compact(self, old_pos, kept)
        if self.pad_resident and not defer_host_checks(self._pos.device):
            self.pad_resident = bool((self._pos[:, :, :keep] < 0).any())
        self.evicted_tokens += n - keep
        self.evictions += 1
        if self.timings is not None:
            self.timings["evict"] += time.perf_counter() - t0
        self._shrink()

    def _shrink(self) -> None:
        """After a long full prefill, give the memory back."""
        target = self.budget + self.buffer + self.last_chunk
        if self.capacity > 2 * target:
            self._realloc(target)

    def keep_scores(self) -> torch.Tensor:
        """The policy's scores (B, H, n) with the rules every policy shares: NaN caught,
        padding -inf, the first ``sinks`` real tokens of each row +inf."""
        self.flush_gates()
        scores = self.policy_scores().float()
        nan = torch.isnan(scores)
        if defer_host_checks(scores.device):  # no host sync: flag it, evict NaN first
            seen = nan.any()
            self._nan_seen = seen if self._nan_seen is None else self._nan_seen | seen
            scores = scores.masked_fill(nan, -math.inf)
        elif nan.any():
            raise self.nan_error()
        pos = self.positions
        scores = torch.where(pos >= 0, scores, torch.full_like(scores, -math.inf))
        if self.sinks:
            scores = torch.where((pos >= 0) & (pos < self.sinks),
                                 torch.full_like(scores, math.inf), scores)
        return scores

    def policy_scores(self) -> torch.Tensor:
        """The policy's raw scores of the resident slots (layouts other than per-head override)."""
        return self.policy.score(self)

    def take_nan_flag(self) -> bool:
        """Whether an eviction saw NaN scores since the last call (the deferred check of
        accelerators; one host read); the flag is cleared."""
        seen, self._nan_seen = self._nan_seen, None
        return seen is not None and bool(seen)

    def nan_error(self) -> KVBoundError:
        return KVBoundError(
            f"NaN eviction scores in layer {self.layer_idx} (policy {self.policy.name}): the "
            "gates or the model produced NaN/inf; check the gate checkpoint and the inputs."
        )

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

    # ---------------------------------------------------------------- masks and sizes
    def attention_mask(self, new_valid: torch.Tensor, dtype: torch.dtype,
                       all_valid: bool = False) -> torch.Tensor | None:
        """This step's additive mask over resident + incoming tokens (:func:`step_mask`)."""
        if new_valid.shape[1] == 1 and all_valid and not self.pad_resident:
            return None  # one new token may see everything: unmasked, as the full cache
        stored = self._pos[:, 0, : self.n] >= 0 if self.n else torch.zeros(
            new_valid.shape[0], 0, dtype=torch.bool, device=new_valid.device)
        return step_mask(stored, new_valid, dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n + query_length, self.seen - self.n

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        raise KVBoundError("EvictionCache cannot be cropped (evicted tokens are gone); assisted "
                           "decoding and rollbacks need the full cache.")

    def reset(self) -> None:
        timings = self.timings
        self.__init__(self.layer_idx, self.budget, self.buffer, self.policy, self.sinks)
        self.timings = timings
