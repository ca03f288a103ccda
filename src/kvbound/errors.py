"""Errors raised at kvbound's public boundary.

Every error says what went wrong and what to do about it; none should surface as a traceback from
deep inside torch or transformers.
"""


class KVBoundError(ValueError):
    """A user-facing error: bad argument, incompatible checkpoint, missing model, ..."""


class ConfigError(KVBoundError):
    """A bad setting of a configuration object (e.g. ``TrainConfig``); ``field`` names the
    setting, so a command line can name its option instead."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class IncompatibleGatesError(KVBoundError):
    """Gate checkpoint made for another model (layer count, hidden size or KV heads differ)."""


class ModelNotFoundError(KVBoundError):
    """A model name or path that cannot be resolved; the message names the install command."""


class UnsupportedArchitectureError(KVBoundError):
    """A model whose architecture kvbound does not support; the message lists the supported ones."""


def check_int(name: str, value, *, minimum: int) -> None:
    """Raise :class:`KVBoundError` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise KVBoundError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise KVBoundError(f"{name} must be >= {minimum}, got {value}.")
