"""Eviction policies: one file each, all run inside one :class:`~kvbound.cache.EvictionCache`."""

from __future__ import annotations

from kvbound.errors import KVBoundError
from kvbound.policies.base import Policy
from kvbound.policies.h2o import H2OPolicy
from kvbound.policies.keydiff import KeyDiffPolicy
from kvbound.policies.knorm import KNormPolicy
from kvbound.policies.pyramidkv import PyramidKVPolicy
from kvbound.policies.random import RandomPolicy
from kvbound.policies.retention import RetentionPolicy
from kvbound.policies.rkv import RKVPolicy
from kvbound.policies.snapkv import SnapKVPolicy
from kvbound.policies.streaming import StreamingPolicy
from kvbound.policies.tova import TOVAPolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        RetentionPolicy,
        StreamingPolicy,
        H2OPolicy,
        TOVAPolicy,
        SnapKVPolicy,
        PyramidKVPolicy,
        KNormPolicy,
        KeyDiffPolicy,
        RKVPolicy,
        RandomPolicy,
    )
}

#: method names accepted by the CLI: every policy plus the uncompressed cache.
METHODS = ("full", *POLICIES)


def get_policy(name: str, **kwargs) -> Policy:
    """Instantiate a registered policy by name; unknown names list the valid ones."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise KVBoundError(
            f"Unknown method {name!r}. Valid: {', '.join(METHODS)}."
        ) from None
    return cls(**kwargs)


__all__ = [
    "METHODS",
    "POLICIES",
    "H2OPolicy",
    "KNormPolicy",
    "KeyDiffPolicy",
    "Policy",
    "PyramidKVPolicy",
    "RKVPolicy",
    "RandomPolicy",
    "RetentionPolicy",
    "SnapKVPolicy",
    "StreamingPolicy",
    "TOVAPolicy",
    "get_policy",
]
