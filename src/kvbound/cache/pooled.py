"""PooledEvictionLayer: a layer whose KV heads share one budget (``budget_scope`` "layer" and
"global", issue 18), so each head holds as many tokens as its scores earn.

Per-head budgets after AdaKV (Feng et al., arXiv 2407.11550) and the global pool of DBTrimKV
("Make Each Token Count", arXiv 2605.09649): TRIM-KV's retention scores are comparable across
heads and layers, so one top-k over the pool spends the memory where the scores ask for it.

Storage: the heads are packed along one slot axis, keys and values (B, 1, cap, d), and each slot
carries its position (-1 = padding) and its KV head (the per-slot state ``"kv_head"``), so the
bytes held are those of the kept tokens plus the buffer, not every head padded to the longest.
A forward's q tokens append H x q slots, head-major. Attention gets the keys as a (B, H, S, d)
broadcast view of the one packed tensor (no copy) and a mask that lets each query head see only
its own KV head's slots (block-diagonal over heads): every query head scores all S slots of the
layer, H times the per-head work at the same total, which is small at bounded sizes
(docs/ARCHITECTURE.md, ``benchmarks/speed.py``). Rows of a batch keep the same number of slots
in a layer (layer scope) or may differ (global scope: a row's surplus slots become padding).

Layer scope: when the layer's slots would pass ``M x H + buffer x H``, keep the top ``M x H``
per row over all its heads, under the rules of every policy (padding -inf, the first ``sinks``
tokens of every head +inf, ties to the most recent) and, with ``min_per_head``, each head's best
``min_per_head`` tokens protected. Global scope: the cache evicts every layer at once
(:meth:`kvbound.cache.EvictionCache.evict_global`); the layers only store.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kvbound.cache.layer import EvictionLayer
from kvbound.errors import KVBoundError
from kvbound.gates import GATE_OUTPUTS

#: the per-slot state that names each slot's KV head
HEAD_STATE = "kv_head"
SCOPES = ("head", "layer", "global")
#: policies whose scores compare across heads and layers: TRIM-KV's retention (a learned
#: probability that the token is still needed, the premise of DBTrimKV), recency and random
#: scores, and attention read per head as a distribution over the head's own tokens (AdaKV's
#: normalisation): TOVA and H2O on the packed slots (kvbound.policies.attention_rows.layer_probs),
#: SnapKV and PyramidKV, which pool along a head's token axis, on a per-head view (PerHeadView).
#: R-KV (attention minus key redundancy), K-norm and KeyDiff have no such normalisation.
POOLED_POLICIES = ("trimkv", "streaming", "random", "tova", "h2o", "snapkv", "pyramidkv")
#: policies scored on a per-head view of the packed slots (they read a head's token axis)
PER_HEAD_VIEW = ("snapkv", "pyramidkv")


def check_scope(scope: str, min_per_head: int, budget: int, policy, static: bool,
                positions: str) -> None:
    """Errors, at construction, for a budget scope the cache cannot run."""
    from kvbound.errors import check_int

    if scope not in SCOPES:
        raise KVBoundError(f"Unknown budget_scope {scope!r}; choose one of {', '.join(SCOPES)}.")
    check_int("min_per_head", min_per_head, minimum=0)
    if scope == "head":
        if min_per_head:
            raise KVBoundError("min_per_head applies to budget_scope 'layer' or 'global' (with "
                               "'head' every head keeps exactly its budget).")
        return
    if min_per_head > budget:
        raise KVBoundError(f"min_per_head ({min_per_head}) cannot exceed the budget per head "
                           f"({budget}).")
    if policy.name not in POOLED_POLICIES:
        raise KVBoundError(f"budget_scope {scope!r} needs scores comparable across heads; "
                           f"policy {policy.name!r} is not supported yet (use one of "
                           f"{', '.join(POOLED_POLICIES)}, or budget_scope 'head').")
    if static:
        raise KVBoundError(f"budget_scope {scope!r} holds a different number of tokens per head; "
                           "a static (compiled) cache needs budget_scope 'head'.")
    if positions == "rolling":
        raise KVBoundError(f"budget_scope {scope!r} keeps absolute positions; rolling positions "
                           "need budget_scope 'head'.")


class DecodeMask(NamedTuple):
    """A decode step's mask and the slot layout it was built for (see
    :meth:`PooledEvictionLayer.attention_mask`)."""

    pos: torch.Tensor  #: the layer's position tensor (replaced when rows are reordered)
    layout: tuple  #: (evictions, slots it covers, dtype)
    mask: torch.Tensor  #: (B, H_q, 1, slots)
    block: torch.Tensor  #: (1, H_q, 1, H) the mask of one decode token's H new slots


class PerHeadView:
    """A pooled layer seen per KV head, (B, H, m): each head's slots in position order (the
    packed axis keeps every head's slots in the order they came), padded with position -1 to the
    fullest head. Policies that read a head's token axis (SnapKV's pooling, its observation
    window) score it exactly as in the head scope; :meth:`to_slots` puts the scores back."""

    def __init__(self, layer: PooledEvictionLayer):
        self._layer = layer
        heads, n = layer.slot_heads, layer.n  # (B, n)
        h = layer.kv_heads
        b = heads.shape[0]
        order = torch.argsort(heads, dim=-1, stable=True)  # head-major, in order within a head
        counts = torch.zeros(b, h, dtype=torch.long, device=heads.device).scatter_add_(
            1, heads, torch.ones_like(heads))
        m = int(counts.max()) if n else 0
        rank = torch.arange(m, device=heads.device)
        self.present = rank[None, None, :] < counts[:, :, None]  # (B, H, m)
        start = counts.cumsum(-1) - counts
        at = (start[:, :, None] + rank).clamp(max=max(n - 1, 0))
        self.index = order.gather(1, at.reshape(b, -1)).reshape(b, h, m) if n else at
        self.n = m
        self.layer_idx, self.budget, self.evictions = layer.layer_idx, layer.budget, \
            layer.evictions
        self.queries = layer.queries

    def _take(self, packed: torch.Tensor) -> torch.Tensor:
        """(B, 1, n, *rest) packed -> (B, H, m, *rest)."""
        b, _, n = packed.shape[:3]
        rest = packed.shape[3:]
        flat = packed[:, 0].reshape(b, n, -1)
        idx = self.index.reshape(b, -1, 1).expand(-1, -1, flat.shape[-1])
        return flat.gather(1, idx).reshape(b, *self.index.shape[1:], *rest)

    @property
    def keys_(self) -> torch.Tensor:
        return self._take(self._layer.keys_)

    @property
    def positions(self) -> torch.Tensor:
        pos = self._take(self._layer.positions[..., None])[..., 0]
        return pos.masked_fill(~self.present, -1)

    @property
    def row_seen(self) -> torch.Tensor:
        return self._layer.row_seen

    def to_slots(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, H, m) scores of the view -> (B, 1, n) scores of the packed slots."""
        b = scores.shape[0]
        out = torch.full((b, self._layer.n), -math.inf, dtype=scores.dtype,
                         device=scores.device)
        rows = torch.arange(b, device=scores.device)[:, None, None].expand_as(self.index)
        # every slot is one (head, rank) of the view: the present entries map onto the slots
        out[rows[self.present], self.index[self.present]] = scores[self.present]
        return out[:, None]


class PooledEvictionLayer(EvictionLayer):
    """One layer's K/V with its KV heads packed on one slot axis (budget shared by the heads)."""

    def __init__(self, layer_idx: int, budget: int, buffer: int, policy, sinks: int, *,
                 kv_heads: int, q_heads: int, min_per_head: int = 0,
                 coordinated: bool = False):
        super().__init__(layer_idx, budget, buffer, policy, sinks)
        self.kv_heads, self.q_heads = kv_heads, q_heads
        self.min_per_head = min_per_head
        self.pool = budget * kv_heads  #: slots kept by a layer-scope eviction
        self.coordinated = coordinated  #: the cache decides when and what to evict (global)
        self.add_state(HEAD_STATE)
        self._head_max = self._head_peak = 0  # tokens of the fullest head, now and at peak
        #: the last decode step's mask and the slot layout it was built for (attention_mask)
        self._decode_mask: DecodeMask | None = None
        self._decode_heads: torch.Tensor | None = None

    @property
    def heads_per_slot(self) -> int:
        return 1

    @property
    def peak_per_head(self) -> int:
        return self._head_peak

    def _recount(self) -> None:
        """The fullest head after an eviction (one host read)."""
        self._head_max = int(self.head_counts().max()) if self.n else 0

    # ---------------------------------------------------------------- views
    @property
    def slot_heads(self) -> torch.Tensor:
        """(B, n) the KV head of each resident slot."""
        return self._state[HEAD_STATE][:, 0, : self.n].long()

    def head_counts(self) -> torch.Tensor:
        """(B, H) real tokens held per row and KV head."""
        real = (self._pos[:, 0, : self.n] >= 0).long()
        out = torch.zeros(real.shape[0], self.kv_heads, dtype=torch.long, device=real.device)
        return out.scatter_add_(1, self.slot_heads, real)

    # ---------------------------------------------------------------- storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, q, d = key_states.shape
        if h != self.kv_heads:
            raise KVBoundError(f"Layer {self.layer_idx} got {h} KV heads, expected "
                               f"{self.kv_heads}.")
        self.dtype, self.device = key_states.dtype, key_states.device
        self._alloc(b, 1, d, value_states.shape[-1], self._target(max(q, 1)))
        if self._row_seen is None:
            self._row_seen = torch.zeros(b, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def _target(self, chunk: int) -> int:
        """Slots a layer needs between evictions: its share plus buffer and chunk per head."""
        held = self.pool if not self.coordinated else self.n
        return held + self.kv_heads * (self.buffer + chunk)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append H x q slots (head-major); return the keys/values as (B, H, S, d) views."""
        if self._pending is None:
            raise KVBoundError("EvictionCache needs kvbound's hooks on the model: build the cache "
                               "with `EvictionCache(model, ...)` (it attaches them) and call "
                               "that model.")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pending, self._pending = self._pending, None
        b, h, q, d = key_states.shape
        new, n = h * q, self.n
        end = n + new
        if end > self.capacity:
            self._alloc(b, 1, d, value_states.shape[-1], max(end + h * self.buffer,
                                                               self._target(q)))
        self.keys.narrow(2, n, new).copy_(key_states.reshape(b, 1, new, d))
        self.values.narrow(2, n, new).copy_(value_states.reshape(b, 1, new, -1))
        pos = pending["pos"]  # (B, q)
        self._pos.narrow(2, n, new).copy_(pos[:, None, :].expand(b, h, q).reshape(b, 1, new))
        for name, tensor in self._state.items():  # gate outputs: written below or when staged
            if name != HEAD_STATE and name not in GATE_OUTPUTS:
                tensor[:, :, n:end] = 0.0
        self._state[HEAD_STATE][:, 0, n:end] = self._slot_heads(q)
        if pending["hidden"] is not None:
            self._gate_log_beta(pending["hidden"])
        self.n = end
        self.seen += q
        if pending["all_valid"]:
            self._row_seen_add += q
        else:
            self._row_seen = self.row_seen + pending["count"]
            self.pad_resident = True
        self.last_chunk = q
        self.peak = max(self.peak, self.n)
        self._head_max += q
        self._head_peak = max(self._head_peak, self._head_max)
        self.resident_sum += self.n
        self.seen_sum += self.seen * h
        self.policy.on_update(self, pending["queries"])
        keys = self.keys.narrow(2, 0, end)
        values = self.values.narrow(2, 0, end)
        return keys.expand(b, h, end, d), values.expand(b, h, end, values.shape[-1])

    def _slot_heads(self, q: int) -> torch.Tensor:
        """(H q,) the KV head of each new slot, head-major (kept for decode steps)."""
        if q != 1:
            return torch.arange(self.kv_heads, device=self.device).repeat_interleave(q).float()
        if self._decode_heads is None:
            self._decode_heads = torch.arange(self.kv_heads, device=self.device).float()
        return self._decode_heads

    def _store_chunk_output(self, name: str, value: torch.Tensor) -> None:
        """Gate output ``name`` (B, H, q) of a chunk appended at slot ``n``: H x q slots,
        head-major."""
        self._state[name][:, 0, self.n : self.n + value[0].numel()] = value.flatten(1)

    def _store_staged_outputs(self, p: int) -> None:
        """The gate's outputs for the ``p`` staged decode tokens: the trailing H x p slots, one
        step's H heads after another (each token was appended as a chunk of one)."""
        h, n = self.kv_heads, self.n
        b = self._pos.shape[0]
        pos = self._pos[:, 0, n - h * p : n].view(b, p, h)[:, :, 0]  # (B, p): a step's heads
        for name, value in self.gates.run(pos).items():  # each (B, H, p)
            self._state[name][:, 0, n - h * p : n] = value.transpose(1, 2).flatten(1)

    # ---------------------------------------------------------------- eviction
    def evict_if_full(self, q: int) -> None:
        h = self.kv_heads
        if (not self.frozen and not self.coordinated and self.n + q * h > self.pool + self.buffer * h
                and self.n > self.pool):
            self.evict(self.pool)

    def policy_scores(self) -> torch.Tensor:
        if self.policy.name in PER_HEAD_VIEW:
            view = PerHeadView(self)
            return view.to_slots(self.policy.score(view))
        return self.policy.score(self)

    def keep_scores(self) -> torch.Tensor:
        scores = super().keep_scores()  # (B, 1, n)
        if not self.min_per_head:
            return scores
        heads = self.slot_heads[:, None, :]
        protect = torch.zeros_like(scores, dtype=torch.bool)
        for k in range(self.kv_heads):
            mine = torch.where(heads == k, scores, torch.full_like(scores, -math.inf))
            m = min(self.min_per_head, mine.shape[-1])
            top = torch.topk(mine, m, dim=-1).indices
            protect.scatter_(-1, top, True)
        protect &= self._pos[:, :, : self.n] >= 0
        return torch.where(protect, torch.full_like(scores, math.inf), scores)

    def keep_mask(self, mask: torch.Tensor) -> None:
        """Keep the slots where ``mask`` (B, n) is true, rows in original order; a row that keeps
        fewer than the most-keeping row fills its tail with padding (global scope)."""
        n = self.n
        counts = mask.long().sum(-1)
        k = int(counts.max()) if counts.numel() else 0
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :k]
        self._compact(order[:, None, :])
        pad = torch.arange(k, device=mask.device)[None, :] >= counts[:, None]
        if bool(pad.any()):
            self._pos[:, 0, :k].masked_fill_(pad, -1)
            self.pad_resident = True
        self.evicted_tokens += n - k
        self.evictions += 1
        self._recount()
        self._shrink()

    def evict(self, keep: int) -> None:
        super().evict(keep)
        self._recount()

    def _shrink(self) -> None:
        target = self._target(self.last_chunk)
        if self.capacity > 2 * target:
            self._realloc(target)

    # ---------------------------------------------------------------- masks
    def attention_mask(self, new_valid: torch.Tensor, dtype: torch.dtype,
                       all_valid: bool = False) -> torch.Tensor:
        """Additive (B, H_q, q, n + H q): each query head sees the real resident slots of its
        own KV head and, causally, the real new tokens of its KV head.

        A decode step whose token is real in every row extends the previous step's mask by the
        new token's H slots (one concatenation) as long as no slot moved since: no eviction,
        no row reordering; otherwise it is rebuilt."""
        if new_valid.shape[1] == 1 and all_valid and self.is_initialized:
            last = self._decode_mask
            if (last is not None and last.pos is self._pos
                    and last.layout == (self.evictions, self.n, dtype)):
                block = last.block
                mask = torch.cat([last.mask, block.expand(new_valid.shape[0], -1, -1, -1)], -1)
            else:
                mask = self._build_mask(new_valid, dtype)
                block = mask[:1, :, :, -self.kv_heads :].clone()  # every step's new slots
            self._decode_mask = DecodeMask(self._pos, (self.evictions, self.n + self.kv_heads,
                                                       dtype), mask, block)
            return mask
        self._decode_mask = None
        return self._build_mask(new_valid, dtype)

    def _build_mask(self, new_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The mask of :meth:`attention_mask`, written once into its (B, H, g, q, S) memory:
        each KV head's resident row broadcast over its query heads and queries, and each
        head's causal block of new slots (a prompt chunk's mask is large: no temporaries)."""
        b, q = new_valid.shape
        h, g, n = self.kv_heads, self.q_heads // self.kv_heads, self.n
        dev = new_valid.device
        low = torch.finfo(dtype).min
        out = torch.empty(b, h, g, q, n + h * q, dtype=dtype, device=dev)
        if n:
            mine = ((self.slot_heads[:, None, :] == torch.arange(h, device=dev)[None, :, None])
                    & (self._pos[:, 0, None, :n] >= 0))  # (B, H, n)
            row = torch.zeros(b, h, n, dtype=dtype, device=dev).masked_fill_(~mine, low)
            out[..., :n] = row[:, :, None, None, :]
        seen = torch.ones(q, q, dtype=torch.bool, device=dev).tril() & new_valid[:, None, :]
        block = torch.zeros(b, q, q, dtype=dtype, device=dev).masked_fill_(~seen, low)
        for k in range(h):  # query heads of KV head k see only k's new slots, causally
            out[:, k, :, :, n:].fill_(low)
            out[:, k, :, :, n + k * q : n + (k + 1) * q] = block[:, None]
        return out.view(b, h * g, q, n + h * q)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n + self.kv_heads * query_length, 0

    def reset(self) -> None:
        timings = self.timings
        self.__init__(self.layer_idx, self.budget, self.buffer, self.policy, self.sinks,
                      kv_heads=self.kv_heads, q_heads=self.q_heads,
                      min_per_head=self.min_per_head, coordinated=self.coordinated)
        self.timings = timings
