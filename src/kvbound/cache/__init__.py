"""The memory-bounded cache: one engine (:class:`EvictionCache`), many policies.

* :mod:`kvbound.cache.cache` - EvictionCache / TrimKVCache: layers from the model config, one
  forward's begin/end.
* :mod:`kvbound.cache.layer` - EvictionLayer: slots, append, evict + compact, masks, batch ops.
* :mod:`kvbound.cache.static` - StaticEvictionLayer: fixed-shape decode steps for torch.compile.
* :mod:`kvbound.cache.gate_staging` - decode-step gate inputs run in one batched gate call.
* :mod:`kvbound.cache.stats` - CacheStats, timings and the KV-bytes formula.
"""

from kvbound.cache.cache import EvictionCache, TrimKVCache, check_int
from kvbound.cache.layer import EvictionLayer, keep_order
from kvbound.cache.static import StaticEvictionLayer
from kvbound.cache.stats import CacheStats, kv_bytes, stored_kv_bytes

__all__ = ["CacheStats", "EvictionCache", "EvictionLayer", "StaticEvictionLayer", "TrimKVCache",
           "check_int", "keep_order", "kv_bytes", "stored_kv_bytes"]
