"""Model loading: :mod:`~kvbound.models.registry` (known models, ``load_model``) and
:mod:`~kvbound.models.convert` (the cached GGUF conversion)."""

from kvbound.models.registry import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    KnownModel,
    cache_dir,
    list_models,
    load_model,
)

__all__ = ["DEFAULT_MODEL", "KNOWN_MODELS", "KnownModel", "cache_dir", "list_models", "load_model"]
