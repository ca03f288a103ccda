"""The one eviction oracle of the suite: an independent, plain-Python re-implementation of the
cache's keep rule, and a spy that checks every eviction of a cache against it.

Rule: padding scores -inf, the first ``sinks`` real tokens +inf; scores equal up to a relative
``TIE_RTOL`` (chained through the sorted scores) are ties; the top-``keep`` by (score group, most
recent first) are kept, in their original order.
"""

from __future__ import annotations

import math

import torch

from kvbound.cache import EvictionLayer
from kvbound.cache.layer import TIE_RTOL


def _tied(a: float, b: float) -> bool:
    if a == b:
        return True
    if math.isinf(a) or math.isinf(b):
        return False
    return abs(a - b) <= TIE_RTOL * max(abs(a), abs(b))


def expected_keep(scores: list[float], positions: list[int], sinks: int, keep: int) -> list[int]:
    """Slots kept from one (row, head) with these policy scores and absolute positions."""
    ranked = []
    for s, p in zip(scores, positions, strict=True):
        if p < 0:
            s = -math.inf
        elif p < sinks:
            s = math.inf
        ranked.append(s)
    order = sorted(range(len(ranked)), key=lambda i: ranked[i], reverse=True)
    group, groups = 0, {}
    for j, i in enumerate(order):
        if j and not _tied(ranked[order[j - 1]], ranked[i]):
            group += 1
        groups[i] = group
    best = sorted(range(len(ranked)), key=lambda i: (groups[i], -i))
    return sorted(best[:keep])


class EvictionSpy:
    """Wraps each layer's ``evict``: checks that it kept exactly the oracle's slots, with their
    keys and per-token state, and that ``score()`` is a pure function of the cache."""

    def __init__(self):
        self.checked = 0

    def install(self, cache):
        for layer in cache.layers:
            if isinstance(layer, EvictionLayer):
                layer.evict = self._wrap(layer, layer.evict)
        return self

    def _wrap(self, layer, original):
        def evict(keep):
            if layer.n <= keep:
                return original(keep)
            scores = layer.policy.score(layer).float().clone()
            again = layer.policy.score(layer).float()
            assert torch.equal(scores, again), "score() must be a pure function of the cache"
            pos = layer.positions.clone()
            keys = layer.keys_.clone()
            states = {k: v[:, :, : layer.n].clone() for k, v in layer._state.items()
                      if v is not None}
            original(keep)
            assert layer.n == keep
            for b in range(pos.shape[0]):
                for h in range(pos.shape[1]):
                    expect = expected_keep(scores[b, h].tolist(), pos[b, h].tolist(),
                                           layer.sinks, keep)
                    assert layer.positions[b, h].tolist() == pos[b, h, expect].tolist()
                    assert torch.equal(layer.keys_[b, h], keys[b, h, expect])
                    for name, before in states.items():
                        assert torch.equal(layer.state(name)[b, h], before[b, h, expect]), name
            self.checked += 1

        return evict
