"""Staged retention-gate inputs of decode steps, run through the gate in one batched call.

A decode step appends one token per layer. Running the layer's retention gate (TRIM-KV, arXiv
2512.03324) on that single token costs its dispatch overhead, not its FLOPs, so the layer only
copies the token's hidden state into a ``(B, rows, hidden)`` buffer; the gate runs once over all
staged tokens when log beta is next read (at the next eviction, every ``buffer`` steps). The
result is the same log beta (and log alpha) as per-token gate calls (tested).
"""

from __future__ import annotations

import torch
from torch import nn


class GateStaging:
    """Hidden states of the trailing resident tokens whose log beta is not computed yet."""

    def __init__(self, buffer: int) -> None:
        self.rows = max(buffer, 1)
        self.gate: nn.Module | None = None
        self.inputs: torch.Tensor | None = None  # (B, rows, hidden)
        self.pending = 0  # staged rows = trailing resident slots without log beta

    def reserve_row(self, batch: int, hidden: int, dtype: torch.dtype, device, flush) -> int:
        """Row for the next decode token's gate input; ``flush()`` empties a full (or
        mis-shaped) buffer first."""
        buf = self.inputs
        if buf is None or buf.shape != (batch, self.rows, hidden) or buf.dtype != dtype:
            flush()
            self.inputs = torch.empty(batch, self.rows, hidden, dtype=dtype, device=device)
        if self.pending == self.rows:
            flush()
        row = self.pending
        self.pending += 1
        return row

    def stage(self, hidden: torch.Tensor, flush) -> None:
        """Copy one decode token's hidden states (B, 1, hidden) into the next free row."""
        b, _, d = hidden.shape
        row = self.reserve_row(b, d, hidden.dtype, hidden.device, flush)
        self.inputs.narrow(1, row, 1).copy_(hidden.detach())

    def stage_at(self, row: torch.Tensor, hidden: torch.Tensor) -> None:
        """Traceable variant for static decode steps: the row is a (1,) tensor index."""
        self.inputs.index_copy_(1, row, hidden.detach().to(self.inputs.dtype))

    def run(self, positions: torch.Tensor | None = None) -> dict[str, torch.Tensor] | None:
        """The gate's outputs (:meth:`apply`) for the ``p`` staged tokens, or ``None`` if none
        is staged; ``positions`` (B, p) are theirs, read by gates with a position input."""
        p = self.pending
        if not p:
            return None
        self.pending = 0
        with torch.no_grad():
            return self.apply(self.inputs[:, :p], positions)

    def apply(self, hidden: torch.Tensor, positions: torch.Tensor | None
              ) -> dict[str, torch.Tensor]:
        """Log beta (and log alpha, for gates that give it) by name, each (B, H_kv, q), of
        ``hidden`` (B, q, hidden); ``positions`` (B, q) go to gates with a position input only."""
        return self.gate.retention(hidden, positions if self.uses_positions else None)

    @property
    def uses_positions(self) -> bool:
        return getattr(self.gate, "uses_positions", False)

    @property
    def outputs(self) -> tuple[str, ...]:
        """Names of the per-token states the gate fills (``log_beta`` [, ``log_alpha``])."""
        return self.gate.outputs
