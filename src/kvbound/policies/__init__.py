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


def check_method(name: str) -> str:
    """``name`` if it is a method (a policy or ``full``); else an error listing the valid ones.
    The one place every entry point (CLI, generate, eval, bench) validates method names."""
    if name not in METHODS:
        raise KVBoundError(f"Unknown method {name!r}. Valid: {', '.join(METHODS)}.")
    return name


def get_policy(name: str, **kwargs) -> Policy:
    """Instantiate a registered policy by name; unknown names list the valid ones."""
    if check_method(name) == "full":
        raise KVBoundError("'full' is the uncompressed cache, not an eviction policy: use "
                           "transformers' DynamicCache (or kvbound.generate(method='full')).")
    return POLICIES[name](**kwargs)


__all__ = [
    "METHODS",
    "check_method",
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
