"""Mutation testing of the engine: does the suite notice when the code is wrong?

    python benchmarks/mutation.py --write-results                      # default targets
    python benchmarks/mutation.py --target src/kvbound/cache/layer.py:keep_order,evict \\
        --tests tests/cache/test_keep_order.py tests/cache/test_cache.py

Each mutant changes one operator in one function of a target (comparison flipped or made strict,
``+``/``-`` and ``*``/``/`` swapped, ``and``/``or`` swapped, ``not`` dropped, an integer constant
moved by one, ``True``/``False`` swapped), is written into a copy of the source tree, and the
given tests run against it in a fresh process (``-x``, one thread, a time limit). A mutant is
killed when the tests fail or time out. The score and every surviving mutant are written to
docs/RELIABILITY.md. Not part of ``make test``: it runs the tests once per mutant.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TARGETS = [
    "src/kvbound/cache/layer.py:keep_order,evict,_compact,evict_if_full,step_mask,_advance",
    "src/kvbound/cache/positions.py:rotate_keys,rolling_ranks,position_ids,after_compact",
]
DEFAULT_TESTS = ["tests/cache/test_keep_order.py", "tests/cache/test_cache.py",
                 "tests/cache/test_positions.py"]

SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
         ast.NotEq: ast.Eq, ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div,
         ast.Div: ast.Mult, ast.And: ast.Or, ast.Or: ast.And}


@dataclass
class Mutant:
    path: str
    function: str
    line: int
    what: str
    source: str


def _mutants(path: Path, functions: set[str]) -> list[Mutant]:
    text = path.read_text()
    tree = ast.parse(text)
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name not in functions:
            continue
        for node in ast.walk(fn):
            for variant, what in _variants(node):
                mutated = ast.parse(text)
                target = _find(mutated, node)
                variant(target)
                out.append(Mutant(str(path.relative_to(ROOT)), fn.name, node.lineno, what,
                                  ast.unparse(mutated)))
    return out


def _variants(node):
    if isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAPS:
        new = SWAPS[type(node.op)]
        yield (lambda n, new=new: setattr(n, "op", new())), \
            f"{type(node.op).__name__} -> {new.__name__}"
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in SWAPS:
                new = SWAPS[type(op)]

                def swap(n, i=i, new=new):
                    n.ops[i] = new()

                yield swap, f"{type(op).__name__} -> {new.__name__}"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield (lambda n: setattr(n, "op", ast.UAdd())), "drop not"
    if isinstance(node, ast.Constant) and type(node.value) is int:
        yield (lambda n: setattr(n, "value", n.value + 1)), f"{node.value} -> {node.value + 1}"
    if isinstance(node, ast.Constant) and type(node.value) is bool:
        yield (lambda n: setattr(n, "value", not n.value)), f"{node.value} -> {not node.value}"


def _find(tree, like):
    for node in ast.walk(tree):
        if (type(node) is type(like) and getattr(node, "lineno", None) == like.lineno
                and getattr(node, "col_offset", None) == like.col_offset):
            return node
    raise LookupError(like)


def _run(mutant: Mutant, tests: list[str], workdir: Path, timeout: float) -> str:
    src = workdir / mutant.path
    original = (ROOT / mutant.path).read_text()
    src.write_text(mutant.source)
    env = {**os.environ, "PYTHONPATH": str(workdir / "src"), "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               "-p", "no:randomly", *tests], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=timeout)
        return "survived" if proc.returncode == 0 else "killed"
    except subprocess.TimeoutExpired:
        return "killed (timeout)"
    finally:
        src.write_text(original)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", action="append", help="PATH:func,func (repeatable)")
    ap.add_argument("--tests", nargs="+", default=DEFAULT_TESTS)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--limit", type=int, default=None, help="first N mutants only")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    mutants = []
    for spec in args.target or DEFAULT_TARGETS:
        path, funcs = spec.split(":")
        mutants += _mutants(ROOT / path, set(funcs.split(",")))
    mutants = mutants[: args.limit] if args.limit else mutants
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "src", work / "src")
        shutil.copytree(ROOT / "tests", work / "tests")
        shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
        results = []
        for i, m in enumerate(mutants):
            outcome = _run(m, args.tests, work, args.timeout)
            results.append((m, outcome))
            print(f"[{i + 1}/{len(mutants)}] {m.path}:{m.line} {m.function}: {m.what}: {outcome}",
                  flush=True)
    killed = sum(o != "survived" for _, o in results)
    score = 100.0 * killed / max(len(results), 1)
    lines = [
        "## Mutation testing of the engine", "",
        f"Command: `{command()}`  ", f"Machine: {machine()}", "",
        f"Targets: {', '.join(args.target or DEFAULT_TARGETS)}; tests: "
        f"{' '.join(args.tests)}; {len(results)} mutants in {time.time() - t0:.0f} s.", "",
        f"**Mutation score: {score:.1f}%** ({killed} of {len(results)} killed).", "",
        "| surviving mutant | where |", "|---|---|",
        *[f"| {m.what} | `{m.path}:{m.line}` ({m.function}) |" for m, o in results
          if o == "survived"],
        "",
    ]
    body = "\n".join(lines)
    print(body)
    if args.write_results:
        doc = ROOT / "docs" / "RELIABILITY.md"
        text = doc.read_text()
        begin, end = "<!-- BEGIN mutation -->", "<!-- END mutation -->"
        block = f"{begin}\n{body}\n{end}"
        if begin in text:
            text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        doc.write_text(text)


if __name__ == "__main__":
    main()
