"""Eviction policies: one file each, all run inside one :class:`~trimkv.cache.EvictionCache`."""

from __future__ import annotations

from trimkv.errors import TrimKVError
from trimkv.policies.base import Policy
from trimkv.policies.h2o import H2OPolicy
from trimkv.policies.keydiff import KeyDiffPolicy
from trimkv.policies.knorm import KNormPolicy
from trimkv.policies.pyramidkv import PyramidKVPolicy
from trimkv.policies.random import RandomPolicy
from trimkv.policies.retention import RetentionPolicy
from trimkv.policies.rkv import RKVPolicy
from trimkv.policies.snapkv import SnapKVPolicy
from trimkv.policies.streaming import StreamingPolicy
from trimkv.policies.tova import TOVAPolicy

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
        raise TrimKVError(
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
