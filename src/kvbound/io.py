"""Crash-safe writes: a kill at any instant never leaves a half-written file, model or checkpoint.

* :func:`atomic_write_bytes` / ``_text`` / ``_json``: temp file, fsync, rename, fsync of the parent.
* :func:`atomic_dir_write`: a directory filled through a temporary sibling. Replacing a whole
  directory uses :func:`write_versioned`, so there is no instant without a complete one.
* :func:`write_versioned` / :func:`read_versioned`: numbered directories ``NAME.000001``, ... plus
  a pointer file ``NAME.current`` replaced atomically. Every numbered directory is complete (it is
  renamed into place only after its files are fsynced); the pointer names the newest, and a reader
  recovers from any leftover (temporary directory, old version, missing pointer).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: test hook: name of the step at which the writer process dies (``os._exit``), see _step()
_KILL_AT: str | None = None


def _step(name: str) -> None:
    """A point between two operations of a crash-safe write; tests kill the writer here."""
    if _KILL_AT == name:
        os._exit(137)


def fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file below ``path`` and the directories themselves to disk."""
    for file in sorted(Path(path).rglob("*")):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif file.is_dir():
            fsync_dir(file)
    fsync_dir(Path(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_dir_write(target: Path, write: Callable[[Path], None],
                     files: Iterable[str] | None = None) -> Path:
    """Fill ``target`` through a temporary sibling directory.

    With ``files`` given, only those files are replaced inside ``target`` (other files there are
    kept), each by an atomic rename, the ``.json`` metadata last; readers that must not mix old
    and new files check a digest (gates do). Without ``files`` the whole directory is replaced:
    the new one is renamed into place only when complete, and an existing one is first moved
    aside to ``.NAME.old`` and removed after (a reader that finds only ``.NAME.old`` may restore
    it: :func:`recover_dir`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write(tmp)
        fsync_tree(tmp)
        if files is not None:
            target.mkdir(parents=True, exist_ok=True)
            for name in sorted(files, key=lambda f: f.endswith(".json")):
                os.replace(tmp / name, target / name)
                _step(f"replaced:{name}")
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = target.with_name(f".{target.name}.old")
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                _step("moved-aside")
            os.replace(tmp, target)
            fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def recover_dir(target: Path) -> Path | None:
    """``target`` if it exists, else its complete predecessor ``.NAME.old`` moved back."""
    target = Path(target)
    if target.exists():
        return target
    old = target.with_name(f".{target.name}.old")
    if old.is_dir():
        os.replace(old, target)
        return target
    return None


# ------------------------------------------------------------------------------- versioned dirs
def _versions(root: Path, name: str) -> list[tuple[int, Path]]:
    pat = re.compile(rf"^{re.escape(name)}\.(\d{{6,}})$")
    found = []
    for entry in root.iterdir() if root.is_dir() else []:
        m = pat.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def read_versioned(root: str | os.PathLike, name: str) -> Path | None:
    """The newest complete version of ``root/NAME`` (see :func:`write_versioned`), or ``None``.

    That is the highest-numbered version (each is complete; the pointer ``NAME.current`` written
    after the rename is for people and tools), else a plain ``root/NAME`` directory (the layout
    before versioning) or its ``.NAME.old`` predecessor.
    """
    root = Path(root)
    versions = _versions(root, name)
    if versions:  # every numbered version is complete; the pointer may lag one rename behind
        return versions[-1][1]
    return recover_dir(root / name)


def write_versioned(root: str | os.PathLike, name: str, write: Callable[[Path], None],
                    keep: int = 1) -> Path:
    """Write a new version of ``root/NAME`` with no instant without a complete one.

    Steps (a kill between any two leaves a readable, complete version): fill a temporary
    directory and fsync it; rename it to ``NAME.<n+1>``; replace the pointer ``NAME.current``
    atomically; remove versions older than the newest ``keep`` and leftover temporaries.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    versions = _versions(root, name)
    number = versions[-1][0] + 1 if versions else 1
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        write(tmp)
        fsync_tree(tmp)
        _step("written")
        final = root / f"{name}.{number:06d}"
        os.replace(tmp, final)
        fsync_dir(root)
        _step("renamed")
        atomic_write_text(root / f"{name}.current", final.name + "\n")
        _step("pointer")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _versions(root, name)[:-keep]:
        trash = old.with_name(f".{old.name}.trash")
        os.replace(old, trash)
        _step("trashed")
        shutil.rmtree(trash, ignore_errors=True)
    for leftover in root.glob(f".{name}.*"):
        if leftover.suffix in (".tmp", ".trash") and leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    legacy = root / name
    if legacy.is_dir():
        shutil.rmtree(legacy, ignore_errors=True)
    return final
