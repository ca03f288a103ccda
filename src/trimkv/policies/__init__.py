"""Eviction policies: one file each, all run inside the same :class:`~trimkv.cache.EvictionCache`."""

from __future__ import annotations

from trimkv.errors import TrimKVError
from trimkv.policies.base import Policy
from trimkv.policies.retention import RetentionPolicy
from trimkv.policies.streaming import StreamingPolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        RetentionPolicy,
        StreamingPolicy,
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


__all__ = ["POLICIES", "METHODS", "Policy", "get_policy", "RetentionPolicy", "StreamingPolicy"]
