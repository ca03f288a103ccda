"""The policy contract: a policy only scores resident tokens; the cache does everything else.

Higher score = keep. The cache adds the rules that are the same for every policy: padding slots
score -inf, the first ``sinks`` tokens of a row +inf, ties keep the most recent token, and the
top-``budget`` tokens per (batch row, KV head) are kept in their original order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Protocol

import torch

#: first tokens of each row protected when the user does not choose: the same for every policy
#: (StreamingLLM's 4 attention sinks), so that methods are compared under the same rules.
DEFAULT_SINKS = 4


def window_for(budget: int, default: int) -> int:
    """Observation window for a budget-``budget`` cache: ``default``, but at most half the
    budget, so that the policy still selects tokens (a window of M would keep only the window)."""
    return max(1, min(default, budget // 2))


class LayerView(Protocol):
    """What a policy may read (and, through ``add_state`` / ``state``, write) of a cache layer.

    Shapes: B batch rows, H KV heads, n resident slots, d head dim, w query window.
    """

    layer_idx: int
    n: int  #: resident slots (same for every head of the layer)
    budget: int  #: tokens per head kept by an eviction
    evictions: int  #: evictions so far
    queries: object  #: last w queries: ``.queries`` (B, H_q, w, d), ``.valid``/``.pos`` (B, w)

    @property
    def keys_(self) -> torch.Tensor: ...  # (B, H, n, d) post-RoPE keys

    @property
    def positions(self) -> torch.Tensor: ...  # (B, H, n) absolute positions, -1 = padding

    @property
    def row_seen(self) -> torch.Tensor: ...  # (B,) real tokens seen per row

    @property
    def log_beta(self) -> torch.Tensor: ...  # (B, H, n) retention gates' log beta (TRIM-KV)

    @property
    def log_alpha(self) -> torch.Tensor | None: ...  # (B, H, n) gates' log importance, if any

    def state(self, name: str) -> torch.Tensor: ...  # (B, H, n) per-token float32 state

    def add_state(self, name: str) -> None: ...  # declare a state compacted with the keys


@dataclass
class Policy:
    """Base class. Subclasses set ``name`` and implement :meth:`score`.

    Class attributes
    ----------------
    needs_gates: the policy reads ``layer.log_beta`` (TRIM-KV).
    query_window: how many recent post-RoPE queries per layer the policy reads
        (``layer.queries.queries`` (B, H_q, w, d), ``layer.queries.valid`` (B, w) and their
        absolute positions ``layer.queries.pos`` (B, w), -1 for padding); 0 for
        query-agnostic scorers. Any value > 0 also makes :meth:`on_update` receive the
        forward's queries.

    Sinks are the cache's (``DEFAULT_SINKS`` unless the user chooses), never a policy's.
    """

    name: ClassVar[str] = "base"
    needs_gates: ClassVar[bool] = False
    query_window: ClassVar[int] = 0

    def fit_budget(self, budget: int) -> Policy:
        """This policy for a cache of ``budget`` tokens per head: settings the user left unset
        that depend on the budget are resolved (SnapKV's window). The cache calls it once."""
        return self

    def layer_budget(self, layer_idx: int, evicted: list[int], budget: int) -> int:
        """Tokens per KV head kept in ``layer_idx`` (uniform by default; PyramidKV varies it)."""
        return budget

    def init_layer(self, layer: LayerView) -> None:
        """Register per-token state with ``layer.add_state(name)`` (compacted with K/V)."""

    def on_update(self, layer: LayerView, new_queries: torch.Tensor | None) -> None:
        """Called after the new K/V were appended (H2O accumulates attention here)."""

    def score(self, layer: LayerView) -> torch.Tensor:
        """Scores (B, H_kv, n) float32 for the ``layer.n`` resident slots; higher = keep."""
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-able description recorded in results."""
        from dataclasses import asdict

        return {"policy": self.name, **asdict(self)}


@dataclass
class WindowedPolicy(Policy):
    """A policy that reads the last ``window`` queries (SnapKV, PyramidKV, R-KV). Unset, the
    window is ``min(DEFAULT_WINDOW, M // 2)`` for a budget-M cache (:func:`window_for`)."""

    #: observation window; None = min(DEFAULT_WINDOW, M // 2), resolved by :meth:`fit_budget`
    window: int | None = None
    DEFAULT_WINDOW: ClassVar[int] = 32

    def window_at(self, budget: int) -> int:
        """The observation window of a budget-``budget`` cache."""
        return window_for(budget, self.DEFAULT_WINDOW) if self.window is None else self.window

    def fit_budget(self, budget: int) -> WindowedPolicy:
        return self if self.window is not None else replace(self, window=self.window_at(budget))

    @property
    def query_window(self) -> int:  # the hook buffers this many recent queries per layer
        return self.DEFAULT_WINDOW if self.window is None else self.window

