"""Rolling positions: RoPE positions counted inside the cache (StreamingLLM, arXiv 2309.17453).

With absolute positions (the default) a token keeps the position it was created at, so a bounded
cache lets generation run past the model's ``max_position_embeddings`` into positions it was never
trained on. With rolling positions a resident token's RoPE position is its rank among the real
tokens its row holds, and a new token gets the next rank: positions stay below ``budget + buffer +
chunk`` however long the run. Keys are stored post-RoPE, so when a compaction moves a token from
rank ``r`` to ``r'`` its key is rotated by ``r' - r``, which RoPE allows exactly (rotations
compose). Policies still see absolute positions (TRIM-KV's decay counts real age).

``positions="auto"`` is absolute positions while the run fits the model's context and switches to
rolling positions (re-rotating every resident key once) when it would pass it.
"""

from __future__ import annotations

import torch
from torch import nn

from kvbound.errors import KVBoundError

MODES = ("absolute", "rolling", "auto")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise KVBoundError(f"positions must be one of {', '.join(MODES)}, got {mode!r}.")
    return mode


def rope_inverse_frequencies(model: nn.Module) -> torch.Tensor:
    """The ``inv_freq`` buffer of the model's (single) rotary embedding."""
    found = {id(m): m for name, m in model.named_modules()
             if name.endswith("rotary_emb") and hasattr(m, "inv_freq")}
    if len(found) != 1:
        raise KVBoundError("positions='rolling' needs a model with one rotary embedding (found "
                           f"{len(found)}); use positions='absolute'.")
    return next(iter(found.values())).inv_freq


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys (B, H, n, d) rotated by ``delta`` (B, H, n) positions (RoPE's rotate-half layout,
    first ``2 * len(inv_freq)`` dims; computed in float32)."""
    rot = 2 * inv_freq.shape[0]
    angles = delta[..., None].float() * inv_freq.to(keys.device, torch.float32)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    part = keys[..., :rot].float()
    half = rot // 2
    rotated = part * cos + torch.cat([-part[..., half:], part[..., :half]], -1) * sin
    out = keys.clone()
    out[..., :rot] = rotated.to(keys.dtype)
    return out


def rolling_ranks(pos: torch.Tensor) -> torch.Tensor:
    """(B, H, n) rolling position of every slot: its rank among the row's real (pos >= 0)
    slots; padding slots (which precede real ones) get 0."""
    real = (pos >= 0).long()
    return (real.cumsum(-1) - 1).clamp_min(0) * real


class RollingPositions:
    """Which positions a cache gives RoPE, and the key re-rotation that rolling ones need."""

    def __init__(self, mode: str, model: nn.Module, max_positions: int | None) -> None:
        self.mode = check_mode(mode)
        self.max_positions = max_positions
        self.active = mode == "rolling"
        self.inv_freq = rope_inverse_frequencies(model) if mode != "absolute" else None

    def should_switch(self, seen_total: int) -> bool:
        """``auto``: the run is about to pass the model's context."""
        return (self.mode == "auto" and not self.active and self.max_positions is not None
                and seen_total > self.max_positions)

    def switch_on(self, layers) -> None:
        """Re-rotate every resident key from its absolute to its rolling position."""
        for layer in layers:
            if layer.is_initialized and layer.n:
                pos = layer.positions
                delta = rolling_ranks(pos) - pos.clamp_min(0)
                layer.keys[:, :, : layer.n] = rotate_keys(layer.keys_, delta, self.inv_freq)
        self.active = True

    def position_ids(self, layer, valid: torch.Tensor) -> torch.Tensor:
        """(B, q) positions of the incoming tokens: the next ranks after the row's real
        resident tokens (``layer`` has already evicted for this forward)."""
        resident = (layer.positions[:, 0] >= 0).sum(-1) if layer.is_initialized and layer.n \
            else torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
        ranks = resident[:, None] + valid.long().cumsum(-1) - 1
        return ranks.clamp_min(0)

    def after_compact(self, layer, old_pos: torch.Tensor, kept: torch.Tensor) -> None:
        """Rotate the keys compacted into slots ``0 : keep`` by their change of rank."""
        old_rank = rolling_ranks(old_pos).gather(-1, kept)
        new_rank = rolling_ranks(layer.positions)
        keep = kept.shape[-1]
        layer.keys[:, :, :keep] = rotate_keys(layer.keys[:, :, :keep], new_rank - old_rank,
                                              self.inv_freq)


def check_rolling_support(layer_kinds: list[str], budgets: set[int], static: bool) -> None:
    if any(kind != "full_attention" for kind in layer_kinds):
        raise KVBoundError("positions='rolling' does not support sliding-window layers (e.g. "
                           "Gemma3) yet; use positions='absolute'.")
    if len(budgets) != 1:
        raise KVBoundError("positions='rolling' needs one budget for every layer (not "
                           "PyramidKV): all layers must give new tokens the same position.")
    if static:
        raise KVBoundError("positions='rolling' is not supported with static=True yet.")
