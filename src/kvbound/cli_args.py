"""Validation of command-line values at the boundary, before any model is loaded.

Every helper raises :class:`OptionError`, whose message starts with the option's name, so a user
sees which option to fix. Numeric ranges and choices are declared on the typer options themselves
(click then names the option); this module checks what a type cannot: text files, output paths,
comma-separated lists, method names, gate sources.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from kvbound.errors import KVBoundError


class OptionError(KVBoundError):
    """A bad value for one command-line option."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


def config(cfg, renamed: dict[str, str] | None = None) -> None:
    """``cfg.validate()`` with its :class:`kvbound.errors.ConfigError` re-raised naming the
    command-line option of the field (``--field-name``, or ``renamed[field]``); the message's
    other field names become option names too."""
    import re
    from dataclasses import fields

    from kvbound.errors import ConfigError

    renamed = renamed or {}

    def option(name: str) -> str:
        return renamed.get(name, "--" + name.replace("_", "-"))
    try:
        cfg.validate()
    except ConfigError as exc:
        names = sorted((f.name for f in fields(cfg)), key=len, reverse=True)
        words = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")(=False)?\b")
        message = re.sub(rf"^{re.escape(exc.field)}(=\w+)? ", "", str(exc))
        raise OptionError(option(exc.field), words.sub(lambda m: option(m.group(1)),
                                                       message)) from None


def check(option: str, fn: Callable, *args, **kwargs):
    """``fn(*args)``; a :class:`KVBoundError` it raises is re-raised naming ``option``."""
    try:
        return fn(*args, **kwargs)
    except OptionError:
        raise
    except KVBoundError as exc:
        raise OptionError(option, str(exc)) from None


def read_text(path: Path, option: str) -> str:
    """The UTF-8 text of ``path``; errors for a missing, unreadable, binary or empty file."""
    path = Path(path)
    if path.is_dir():
        raise OptionError(option, f"{path} is a directory; give a text file.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OptionError(option, f"cannot read {path}: {exc.strerror or exc}.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OptionError(option, f"{path} is not UTF-8 text (byte {exc.start} is not valid "
                                  "UTF-8); convert it, e.g. with iconv.") from None
    if "\x00" in text:
        raise OptionError(option, f"{path} looks binary (it holds NUL bytes); give a text file.")
    if not text.strip():
        raise OptionError(option, f"{path} is empty.")
    return text


def nonempty(text: str, option: str) -> str:
    if not text.strip():
        raise OptionError(option, "the text is empty.")
    return text


def writable(path: Path, option: str, *, directory: bool) -> Path:
    """``path`` can be created (or replaced) as a directory / file: its first existing ancestor
    is a writable directory and ``path`` itself is not of the other kind."""
    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            raise OptionError(option, f"{path} exists and is not a directory.")
        if not directory and path.is_dir():
            raise OptionError(option, f"{path} is a directory; give a file name.")
    parent = path if directory and path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError(option, f"cannot create {path}: {parent} is not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(option, f"cannot write into {parent} (permission denied).")
    return path


def csv(value: str, option: str, cast: Callable = str, *, minimum: int | None = None) -> list:
    """A comma-separated list, each item cast (and at least ``minimum`` for numbers)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise OptionError(option, f"expected a comma-separated list, got {value!r}.")
    try:
        out = [cast(v) for v in items]
    except ValueError:
        raise OptionError(option, f"cannot parse {value!r} as a list of {cast.__name__}.") from None
    if minimum is not None and any(v < minimum for v in out):
        raise OptionError(option, f"every value must be >= {minimum}, got {value!r}.")
    return out


def methods(value: str, option: str, *, compile_suffix: bool = False,
            scope_suffix: bool = False) -> list[str]:
    """Method names (``NAME+compile`` too when ``compile_suffix``; ``NAME@SCOPE``, a budget
    scope, when ``scope_suffix``)."""
    from kvbound.cache.pooled import POOLED_POLICIES, SCOPES
    from kvbound.policies import check_method

    names = csv(value, option)
    for name in names:
        base = name.removesuffix("+compile") if compile_suffix else name
        if scope_suffix and "@" in base:
            base, _, scope = base.partition("@")
            if scope not in SCOPES:
                raise OptionError(option, f"unknown budget scope {scope!r} in {name!r}; choose "
                                          f"from {', '.join(SCOPES)}.")
            if scope != "head" and base not in POOLED_POLICIES:
                raise OptionError(option, f"budget scope {scope!r} supports "
                                          f"{', '.join(POOLED_POLICIES)}, not {base!r}.")
            if name.endswith("+compile") and scope != "head":
                raise OptionError(option, f"{name!r}: a compiled (static) cache needs the "
                                          "head scope.")
        check(option, check_method, base)
    return names


def gates_source(value: str | None, option: str) -> str | None:
    """A gate directory or shipped name that exists (``None``: the default gates)."""
    if value is None:
        return None
    from kvbound.gates import resolve_gates_path

    check(option, resolve_gates_path, value)
    return value


def model_name(value: str | None, option: str) -> str | None:
    """A local model path that exists (names and Hub ids are checked when loading)."""
    if value is not None and (value.startswith((".", "/", "~")) or os.sep in value[:1]):
        if not Path(value).expanduser().exists():
            raise OptionError(option, f"no model at {value!r}: the path does not exist.")
    return value


def device(value: str, option: str) -> str:
    """``cpu``, or ``cuda`` / ``cuda:N`` where such a GPU exists."""
    import torch

    kind, _, index = value.partition(":")
    if kind == "cpu" and not index:
        return value
    if kind != "cuda" or (index and not index.isdigit()):
        raise OptionError(option, f"{value!r} is not a device: use cpu, cuda or cuda:N.")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(index or 0) >= count:
        raise OptionError(option, f"no CUDA GPU {value!r} here ({count} visible); use cpu.")
    return value


def pair(value: str, option: str) -> tuple[int, int]:
    """``LAYER:HEAD``."""
    try:
        layer, head = value.split(":")
        out = int(layer), int(head)
    except ValueError:
        raise OptionError(option, f"expected LAYER:HEAD, got {value!r}.") from None
    if min(out) < 0:
        raise OptionError(option, f"layer and head must be >= 0, got {value!r}.")
    return out


def decoding(sample: bool, temperature: float, top_p: float, repetition_penalty: float) -> None:
    """--sample / --temperature / --top-p / --repetition-penalty: values decoding can use."""
    if sample and temperature <= 0:
        raise OptionError("--temperature", "must be > 0 with --sample (use greedy decoding, "
                                           "without --sample, for T = 0).")
    if sample and top_p <= 0:
        raise OptionError("--top-p", "must be > 0 with --sample.")
    if repetition_penalty <= 0:
        raise OptionError("--repetition-penalty", "must be > 0 (1 = off).")
