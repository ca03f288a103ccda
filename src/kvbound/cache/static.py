"""Static-shape decoding for torch.compile: a fixed ``budget + buffer + 1`` slots per layer.

Each static decode step is split in two:

* eager (:meth:`StaticDecode.begin`, from the model-level pre-hook, which stays eager inside a
  compiled ``__call__``): evict when a layer is full, run staged gates, advance every Python
  counter, write the new token's slot and staging row into shared 1-element tensors, and build
  the step's ``(B, 1, 1, slots)`` mask once for all layers;
* compiled (:meth:`StaticEvictionLayer.update` and the attention hook): ``index_copy_`` of keys,
  values, positions and gate inputs at those tensor indices, and the prepared mask.

The tensors stay the same from step to step, so a compiled decode step never sees a new shape.
"""

from __future__ import annotations

import torch

from kvbound.cache.layer import EvictionLayer
from kvbound.errors import KVBoundError
from kvbound.policies import Policy


def check_static_support(layer_kinds: list[str], policy: Policy, budgets: set[int]) -> None:
    """Raise unless a static cache can serve this model and policy."""
    if any(kind != "full_attention" for kind in layer_kinds):
        raise KVBoundError("static=True does not support models with sliding-window layers "
                           "(e.g. Gemma3) yet; use the default dynamic cache.")
    if policy.query_window or type(policy).on_update is not Policy.on_update:
        raise KVBoundError(
            f"static=True needs a policy that scores from stored tokens only; "
            f"{policy.name!r} tracks attention. Use trimkv, streaming, knorm, keydiff or "
            "random, or the default dynamic cache."
        )
    if len(budgets) != 1:
        raise KVBoundError("static=True needs one budget for every layer.")


class StaticDecode:
    """The state every static layer of one cache shares during a decode step."""

    def __init__(self, hidden_size: int) -> None:
        self.active = False  # this forward is a static decode step
        self.slot = torch.zeros(1, dtype=torch.long)  # slot of the new token
        self.gate_slot = torch.zeros(1, dtype=torch.long)  # its row in the staged gate inputs
        self.seen_before = torch.zeros((), dtype=torch.long)  # get_seq_length() in the step
        self.mask: torch.Tensor | None = None  # (B, 1, 1, slots), shared by every layer
        self.hidden_size = hidden_size

    def begin(self, layers: list[StaticEvictionLayer], needs_gates: bool, valid: torch.Tensor,
              pos: torch.Tensor, count: torch.Tensor, all_valid: bool) -> bool:
        """Eager half of a decode step for every layer; ``False`` if nothing is prefilled yet
        (then the step runs the dynamic way)."""
        rep = layers[0]
        if not rep.is_initialized:
            return False
        seen_before = rep.seen
        hidden = (self.hidden_size, rep.keys.dtype) if needs_gates else None
        slots = {layer.begin_step(pos, count, all_valid, hidden) for layer in layers}
        if len(slots) != 1:  # cannot happen with one budget; guards the shared slot tensors
            raise KVBoundError(f"static layers went out of step: {sorted(slots)}")
        slot, gate_slot = slots.pop()
        device = rep.device
        if self.slot.device != device:
            self.slot, self.gate_slot = self.slot.to(device), self.gate_slot.to(device)
            self.seen_before = self.seen_before.to(device)
        self.seen_before.fill_(seen_before)
        self.slot.fill_(slot)
        self.gate_slot.fill_(gate_slot)
        b, cap, dtype = valid.shape[0], rep.capacity, rep.keys.dtype
        if self.mask is None or self.mask.shape != (b, 1, 1, cap) or self.mask.dtype != dtype:
            self.mask = torch.zeros(b, 1, 1, cap, dtype=dtype, device=device)
            for t in (self.mask, self.slot, self.gate_slot, self.seen_before):
                torch._dynamo.mark_static_address(t)
        allowed = torch.zeros(b, cap, dtype=torch.bool, device=device)
        allowed[:, :slot] = rep._pos[:, 0, :slot] >= 0  # padding slots are alike in all heads
        allowed[:, slot] = valid[:, 0]
        self.mask.copy_(torch.where(allowed, 0.0, torch.finfo(dtype).min)[:, None, None])
        return True


class StaticEvictionLayer(EvictionLayer):
    """An EvictionLayer whose decode steps keep :attr:`static_capacity` slots and write at
    tensor indices (prefill chunks run the dynamic way)."""

    is_compileable = True

    def __init__(self, layer_idx: int, budget: int, buffer: int, policy: Policy, sinks: int,
                 shared: StaticDecode):
        super().__init__(layer_idx, budget, buffer, policy, sinks)
        self.shared = shared
        self._step_pos: torch.Tensor | None = None  # (B, 1) position of the step's token

    @property
    def static_capacity(self) -> int:
        """Slots while decoding: budget + buffer + the incoming token."""
        return self.budget + self.buffer + 1

    def begin_step(self, pos: torch.Tensor, count: torch.Tensor, all_valid: bool,
                   hidden: tuple[int, torch.dtype] | None) -> tuple[int, int]:
        """Eager half of a decode step: evict if needed, keep the storage at
        :attr:`static_capacity` slots, advance the counters now. ``hidden`` is (hidden size,
        dtype) when gate inputs are staged. Returns (slot, gate slot)."""
        if self.n + 1 > self.budget + self.buffer and self.n > self.budget:
            self.evict(self.budget)
        if self.capacity != self.static_capacity:
            self._realloc(self.static_capacity)
            self._mark_static()
        gate_slot = 0
        if hidden is not None:
            gate_slot = self.gates.reserve_row(self.keys.shape[0], hidden[0], hidden[1],
                                               self.device, self.flush_gates)
        slot = self.n
        self._step_pos = pos
        self._advance(1, count, all_valid)
        return slot, gate_slot

    def _mark_static(self) -> None:
        """Tell torch.compile these tensors keep their address from step to step (eviction
        compacts them in place): CUDA graphs (``mode="reduce-overhead"``) then read them where
        they are instead of copying the whole cache into the graph's buffers every step."""
        for t in (self.keys, self.values, self._pos, *self._state.values()):
            if t is not None:
                torch._dynamo.mark_static_address(t)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.shared.active:
            return super().update(key_states, value_states, *args, **kwargs)
        # compiled half: in-place writes at a tensor index only
        slot = self.shared.slot
        self.keys.index_copy_(2, slot, key_states)
        self.values.index_copy_(2, slot, value_states)
        self._pos.index_copy_(2, slot, self._step_pos[:, None, :].expand(-1, self._pos.shape[1], -1))
        return self.keys, self.values

    def stage_gate_input(self, hidden: torch.Tensor) -> None:
        """Compiled half: the step token's gate input into its staging row."""
        self.gates.stage_at(self.shared.gate_slot, hidden)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if query_length == 1 and self.is_initialized:
            # a static decode step: constant while decoding (the hook supplies the real mask)
            return self.static_capacity, 0
        return super().get_mask_sizes(query_length)

    def reset(self) -> None:
        timings = self.timings
        self.__init__(self.layer_idx, self.budget, self.buffer, self.policy, self.sinks,
                      self.shared)
        self.timings = timings
