"""What a cache holds, and the one KV-bytes formula that generate, bench and eval share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


def kv_bytes(tokens: int, *, batch: int, kv_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes of keys + values for ``tokens`` tokens summed over layers (one K and one V vector of
    ``head_dim`` per KV head, batch row and token)."""
    return 2 * tokens * batch * kv_heads * head_dim * element_size


def stored_kv_bytes(cache) -> int:
    """Bytes of the key/value tensors a transformers cache stores now (any cache class whose
    layers hold ``keys`` / ``values``, e.g. DynamicCache or StaticCache)."""
    total = 0
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is not None and values is not None:
            total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
    return total


@dataclass
class CacheStats:
    """What an EvictionCache held: per evicted layer and KV head (uniform within a layer)."""

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
    #: who shares the budget: "head", "layer" or "global" (EvictionCache's budget_scope)
    budget_scope: str = "head"
    #: bytes of the key/value tensors allocated now (kept tokens, buffer and slack)
    allocated_kv_bytes: int = 0
    #: per evicted layer, the real tokens each KV head holds now (mean over batch rows)
    kept_per_head: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def new_timings() -> dict[str, float]:
    """Seconds spent outside the model's own compute: gate / query recomputation
    ("scoring_inputs") and eviction + mask building ("cache_bookkeeping", which includes
    "evict")."""
    return {"scoring_inputs": 0.0, "cache_bookkeeping": 0.0, "evict": 0.0}
