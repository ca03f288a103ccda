"""Evaluation over several processes: give each one a slice of the work, merge the result JSONs.

There is no communication between the processes: each runs its slice with the ordinary
single-process code (:func:`kvbound.eval.fidelity.run_fidelity`, :func:`kvbound.eval.runner.run_eval`)
and writes its own result file; one process (or a later command) merges the files.

* :func:`shard` - round-robin slice ``items[rank::world]`` (disjoint, covers everything, sizes
  differ by at most one; order the items by cost first to balance the load).
* :func:`shard_grid` - this process's part of a tasks x methods grid, as ``{task: [methods]}``
  (one :func:`~kvbound.eval.runner.run_eval` call per task, each with its own output directory).
* :func:`rank_world` - ``(rank, world)`` from the environment that ``torchrun`` /
  ``accelerate launch`` set (``RANK``, ``WORLD_SIZE``); ``(0, 1)`` outside a launcher.
* :func:`merge_results` - one result dict from several fidelity JSONs (``kvbound eval fidelity
  --json``) or task summaries (``results.json`` of ``kvbound eval tasks``).

What to shard (see docs/distributed.md): fidelity - the methods (every process scores the same
windows; the full-cache pass is recomputed by each). Tasks - the tasks, or the tasks x methods
grid; :func:`run_eval` always runs the full cache first on each of its tasks (bounded methods
are scored against its answers), so a task split over several processes has its full-cache
reference computed by each of them, and the merge keeps one copy. Do not shard the windows or
examples of one (method, budget): per-result means are not re-weighted here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kvbound.errors import KVBoundError

__all__ = ["merge_results", "rank_world", "shard", "shard_grid"]

T = TypeVar("T")

#: top-level keys of the config that may differ between shards (their lists are unioned)
_CONFIG_UNION = ("tasks", "methods", "budgets", "data")
#: keys ignored when checking that two copies of the same result agree (wall-clock times)
_VOLATILE = ("seconds",)


def shard(items: Sequence[T] | Iterable[T], rank: int, world: int) -> list[T]:
    """The items of process ``rank`` out of ``world``: ``items[rank::world]``."""
    if not isinstance(world, int) or world < 1:
        raise KVBoundError(f"world must be a positive integer, got {world!r}.")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise KVBoundError(f"rank must be in [0, {world}), got {rank!r}.")
    return list(items)[rank::world]


def shard_grid(tasks: Sequence[str], methods: Sequence[str], rank: int,
               world: int) -> dict[str, list[str]]:
    """Round-robin share of the ``tasks x methods`` grid for ``rank``: ``{task: [methods]}``.

    Tasks without a method for this rank are left out. ``"full"`` is dropped from ``methods``
    (:func:`~kvbound.eval.runner.run_eval` runs it on every task anyway).
    """
    grid = [(t, m) for t in tasks for m in methods if m != "full"]
    out: dict[str, list[str]] = {}
    for task, method in shard(grid, rank, world):
        out.setdefault(task, []).append(method)
    return out


def rank_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment (torchrun, accelerate launch); else ``(0, 1)``."""
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as exc:
        raise KVBoundError(f"Bad RANK/WORLD_SIZE in the environment: {exc}") from None
    return rank, world


def _result_key(r: dict) -> tuple:
    # task summaries: (task, method, budget); fidelity: (label, budget) (label defaults to method)
    return (r.get("task"), r.get("label", r.get("method")), r.get("budget"))


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _union(a: list, b: list) -> list:
    seen = {json.dumps(x, sort_keys=True, default=str) for x in a}
    out = list(a)
    for x in b:
        key = json.dumps(x, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(x)
    return out


def _merge_config(a: dict, b: dict, where: str) -> dict:
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = v
        elif k in _CONFIG_UNION and isinstance(out[k], list) and isinstance(v, list):
            out[k] = _union(out[k], v)
        elif k in _CONFIG_UNION and isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = _merge_config(out[k], v, f"{where}.{k}")
        elif out[k] != v:
            raise KVBoundError(f"Shards disagree on {where}.{k}: {out[k]!r} vs {v!r}; they are "
                              "not parts of the same evaluation.")
    return out


def merge_results(paths: Iterable[str | os.PathLike]) -> dict:
    """Merge per-process result JSONs (each a dict with a ``"results"`` list) into one dict.

    ``results`` are concatenated in file order; a result present in several files (same task,
    method/label and budget, e.g. the full-cache reference of a task split over processes) is
    kept once if the copies agree apart from timings, otherwise :class:`KVBoundError`.
    ``seconds`` is summed (compute time, not wall time), ``command`` becomes ``commands`` (one per
    file), the ``config`` lists of tasks/methods/budgets are unioned, and every other top-level
    field must be equal in all files (same model, windows, protocol, seed, versions, ...).
    The file names are recorded under ``merged_from``.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise KVBoundError("merge_results needs at least one result file.")
    merged: dict[str, Any] = {}
    results: list[dict] = []
    index: dict[tuple, int] = {}
    seconds, commands, timed = 0.0, [], False
    for path in paths:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise KVBoundError(f"Cannot read result file {path}: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
            raise KVBoundError(f"{path} is not a result file (no 'results' list).")
        for key, value in doc.items():
            if key == "results":
                continue
            if key == "seconds":
                seconds += float(value or 0)
                timed = True
            elif key == "command":
                commands.append(value)
            elif key == "config" and isinstance(value, dict):
                merged[key] = _merge_config(merged.get(key, {}), value, "config")
            elif key not in merged:
                merged[key] = value
            elif merged[key] != value:
                raise KVBoundError(f"Shards disagree on {key!r} ({path}): {merged[key]!r} vs "
                                  f"{value!r}; they are not parts of the same evaluation.")
        for r in doc["results"]:
            k = _result_key(r)
            if k in index:
                if _strip(results[index[k]]) != _strip(r):
                    raise KVBoundError(f"Conflicting results for {k} in {path}: the same "
                                      "(task, method, budget) was computed differently.")
                continue
            index[k] = len(results)
            results.append(r)
    if timed:
        merged["seconds"] = round(seconds, 1)
    if commands:
        merged["commands"] = commands
    merged["merged_from"] = [str(p) for p in paths]
    merged["results"] = results
    return merged
