"""Mutation testing of the engine: does the suite notice when the code is wrong?

    python benchmarks/mutation.py --write-results                 # cache + policies, all functions
    python benchmarks/mutation.py --target src/kvbound/cache/layer.py:keep_order,evict \\
        --tests "tests/cache/test_keep_order.py tests/cache/test_cache.py -k 'not slow'"
    python benchmarks/mutation.py --resume --write-results        # continue a stopped run
    python benchmarks/mutation.py --resume --rerun-survivors      # after adding tests

Each mutant changes one operator in one function of a target (comparison flipped or made strict,
``+``/``-`` and ``*``/``/`` swapped, ``and``/``or`` swapped, ``not`` dropped, an integer constant
moved by one, ``True``/``False`` swapped). A fork server imports torch, transformers and pytest
once; each mutant runs in a forked child that writes the mutant into its own copy of the source
tree, imports kvbound from there and runs the tests (``-x``, one thread, a time limit). The first
child runs the whole test set on the unmodified tree under per-test coverage; each mutant then
runs only the tests of that set that execute its function (the tests that cannot see it are
skipped, as mutmut does), or the whole set where no test does (code run at import time).
Two children run at once (``--jobs``). A mutant is killed when the tests fail or time out.
Outcomes are appended to ``docs/data/mutation.jsonl`` as they come, a file kept in the repository
so that a run stopped in one session continues in the next (``--resume`` skips mutants already
decided there; a mutant is named by the digest of its mutated file, so editing a file retires the
decisions about its mutants). Surviving mutants that cannot be killed (equivalent mutants) are explained in
``benchmarks/mutation_explained.json``; the score, every survivor and its explanation are written
to docs/RELIABILITY.md. Not part of ``make test``: it runs the tests once per mutant.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENGINE = sorted(str(p.relative_to(ROOT)) for d in ("cache", "policies")
                for p in (ROOT / "src" / "kvbound" / d).glob("*.py"))
DEFAULT_TARGETS = [f"{p}:*" for p in ENGINE]
# every test of the engine on tiny models (a mutant runs those of them that execute its
# function); the compile tests are left out for time
DEFAULT_TESTS = ["tests/cache", "tests/policies", "tests/eval/test_oracle.py",
                 "tests/gates/test_gates.py", "tests/gates/test_gate_positions.py",
                 "-k", "not compile and not compiled"]
LOG = ROOT / "docs" / "data" / "mutation.jsonl"
EXPLAINED = ROOT / "benchmarks" / "mutation_explained.json"

SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
         ast.NotEq: ast.Eq, ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div,
         ast.Div: ast.Mult, ast.And: ast.Or, ast.Or: ast.And}


@dataclass
class Mutant:
    path: str
    function: str
    line: int
    what: str
    code: str  # the original source line, stripped
    source: str
    span: tuple[int, int] = (0, 0)  # the mutated function's first and last line

    @property
    def key(self) -> str:
        """Stable across unrelated edits: file, function, original line text, mutation, and the
        position of this mutation among identical ones."""
        return f"{self.path}:{self.function}:{self.code}:{self.what}"

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()[:16]


def _mutants(path: Path, functions: set[str] | None) -> list[Mutant]:
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    out, seen = [], {}
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if functions is not None and fn.name not in functions:
            continue
        for node in _own_nodes(fn):
            for variant, what in _variants(node):
                mutated = ast.parse(text)
                variant(_find(mutated, node))
                code = lines[node.lineno - 1].strip()
                m = Mutant(str(path.relative_to(ROOT)), fn.name, node.lineno, what, code,
                           ast.unparse(mutated), (fn.lineno, fn.end_lineno or fn.lineno))
                n = seen.get(m.key, 0)
                seen[m.key] = n + 1
                if n:
                    m.what = f"{what} #{n + 1}"
                out.append(m)
    return out


def _own_nodes(fn):
    """The nodes of ``fn`` outside its nested functions (those are mutated as functions)."""
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


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
    where = ("lineno", "col_offset", "end_lineno", "end_col_offset")
    for node in ast.walk(tree):
        if type(node) is type(like) and all(getattr(node, a, None) == getattr(like, a)
                                            for a in where):
            return node
    raise LookupError(like)


def _preload() -> None:
    """Import what every child needs once, in the server: torch, transformers, pytest and the
    third-party modules kvbound pulls in (the model classes of the tiny test models included).
    kvbound itself is imported to find them and then forgotten (its modules leave
    ``sys.modules``), so each child imports its own, mutated tree; a child that got the real
    tree is caught (exit code 99)."""
    import hypothesis  # noqa: F401
    import pytest  # noqa: F401
    import torch
    import transformers  # noqa: F401

    torch.set_num_threads(1)
    assert "kvbound" not in sys.modules, "the fork server must start without kvbound"
    sys.path.insert(0, str(ROOT / "src"))
    try:
        import kvbound.cache  # noqa: F401
        import kvbound.policies  # noqa: F401
        from kvbound.testing import TINY_ARCHS, tiny_model

        for arch in TINY_ARCHS:
            tiny_model(arch, seed=0)
    finally:
        sys.path.remove(str(ROOT / "src"))
        for name in [m for m in sys.modules if m == "kvbound" or m.startswith("kvbound.")]:
            del sys.modules[name]


def _child(mutant: Mutant | None, tests: list[str], workdir: Path,
           coverage_out: Path | None = None) -> None:
    """In a forked child: write the mutant, import kvbound from ``workdir``, run the tests. With
    ``coverage_out`` (the unmutated run), record which test executes which line of the targets
    and write it there as JSON: {path: {line: [test node ids]}}."""
    code = 1
    try:
        if mutant is not None:
            (workdir / mutant.path).write_text(mutant.source)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.chdir(workdir)
        sys.path.insert(0, str(workdir / "src"))
        sys.path.insert(0, str(workdir))
        import pytest

        plugins, cov = [], None
        if coverage_out is not None:
            import coverage

            cov = coverage.Coverage(data_file=None, include=[str(workdir / "src" / "*")])
            plugins.append(_TestContexts(cov))
            cov.start()
        code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", *tests],
                           plugins=plugins)
        if cov is not None:
            cov.stop()
            _write_coverage(cov.get_data(), workdir, coverage_out)
        import kvbound

        if not Path(kvbound.__file__).resolve().is_relative_to(workdir.resolve()):
            code = 99  # imported the real tree, not the mutant: a broken run, not a survivor
    finally:
        os._exit(int(code))


class _TestContexts:
    """pytest plugin: each test runs under a coverage context named by its node id."""

    def __init__(self, cov):
        self.cov = cov

    def pytest_runtest_protocol(self, item, nextitem):
        self.cov.switch_context(item.nodeid)

    def pytest_runtest_logfinish(self, nodeid, location):
        self.cov.switch_context("")


def _write_coverage(data, workdir: Path, out: Path) -> None:
    lines = {}
    for f in data.measured_files():
        rel = str(Path(f).resolve().relative_to(workdir.resolve()))
        lines[rel] = {n: sorted(c for c in ctx if c)
                      for n, ctx in data.contexts_by_lineno(f).items()}
    out.write_text(json.dumps(lines))


def _tests_for(mutant: Mutant, covered: dict, tests: list[str]) -> list[str]:
    """The tests that execute the mutant's function on the unmodified tree, else all ``tests``."""
    by_line = covered.get(mutant.path, {})
    chosen = {t for n in range(mutant.span[0], mutant.span[1] + 1)
              for t in by_line.get(str(n), ())}
    return sorted(chosen) if chosen else tests


class Pool:
    """Runs mutants in forked children, ``jobs`` at a time, each in its own tree copy."""

    def __init__(self, jobs: int, tests: list[str], timeout: float, root: Path):
        self.tests, self.timeout = tests, timeout
        self.free = []
        for j in range(jobs):
            work = root / f"w{j}"
            shutil.copytree(ROOT / "src", work / "src")
            shutil.copytree(ROOT / "tests", work / "tests")
            shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
            self.free.append(work)
        self.running: dict[int, tuple[Mutant | None, Path, float]] = {}

    def start(self, mutant: Mutant | None, tests: list[str] | None = None,
              coverage_out: Path | None = None) -> None:
        work = self.free.pop()
        pid = os.fork()
        if pid == 0:
            _child(mutant, self.tests if tests is None else tests, work, coverage_out)
        self.running[pid] = (mutant, work, time.time())

    def wait_one(self) -> tuple[Mutant | None, str]:
        while True:
            for pid, (m, work, t0) in list(self.running.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                timed_out = not done and time.time() - t0 > self.timeout
                if timed_out:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                if done or timed_out:
                    del self.running[pid]
                    if m is not None:
                        (work / m.path).write_text((ROOT / m.path).read_text())
                    self.free.append(work)
                    code = os.waitstatus_to_exitcode(status) if done else None
                    if code == 99:
                        raise RuntimeError("a child imported kvbound from the real tree")
                    outcome = ("killed (timeout)" if timed_out else
                               "survived" if code == 0 else "killed")
                    return m, outcome
            time.sleep(0.05)


#: kinds of explained survivors: only "equivalent" ones (no test could kill them) leave the
#: denominator of the standard score; "benign" ones change something no result depends on
#: (timing attribution, a memory heuristic's boundary) and count as survivors, as do the others
KINDS = ("equivalent", "benign", "compile-only", "killed-later")


def _explained() -> dict[str, dict]:
    """Survivor key -> {"kind": one of KINDS, "why": text}."""
    out = json.loads(EXPLAINED.read_text()) if EXPLAINED.exists() else {}
    bad = {k: v for k, v in out.items() if not isinstance(v, dict) or v.get("kind") not in KINDS}
    if bad:
        raise SystemExit(f"{EXPLAINED}: give each entry a kind in {KINDS} and a why: "
                         f"{sorted(bad)[:3]}")
    return out


def _log(path: Path) -> dict[str, dict]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["digest"]] = rec
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", action="append", help="PATH:func,func or PATH:* (repeatable)")
    ap.add_argument("--tests", type=shlex.split, default=DEFAULT_TESTS,
                    help="pytest arguments, one string (default: the cache and policy tests)")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="first N mutants only")
    ap.add_argument("--log", type=Path, default=LOG)
    ap.add_argument("--resume", action="store_true", help="skip mutants decided in --log")
    ap.add_argument("--rerun-survivors", action="store_true",
                    help="with --resume: run the logged survivors again (after new tests), "
                         "except those explained as equivalent, benign or compile-only")
    ap.add_argument("--report-only", action="store_true",
                    help="render the mutants decided in --log (e.g. of a stopped run), run none")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    targets = args.target or DEFAULT_TARGETS
    mutants = []
    for spec in targets:
        path, funcs = spec.split(":")
        mutants += _mutants(ROOT / path, None if funcs == "*" else set(funcs.split(",")))
    mutants = mutants[: args.limit] if args.limit else mutants
    logged = _log(args.log) if args.resume or args.report_only else {}
    if args.report_only:
        results = [(m, logged[m.digest]["outcome"]) for m in mutants if m.digest in logged]
        body = _report(results, targets, args.tests, 0.0, len(mutants))
        print(body)
        if args.write_results:
            _write(body)
        return
    if not args.resume and args.log.exists():
        args.log.unlink()
    # survivors explained as unkillable (equivalent, benign, compile-only) are not run again
    settled = {k for k, v in _explained().items() if v["kind"] != "killed-later"}
    again = [m for m in mutants if args.rerun_survivors and m.digest in logged
             and logged[m.digest]["outcome"] == "survived" and m.key not in settled]
    todo = [m for m in mutants if m.digest not in logged]
    # seeded random order: a run stopped part-way has decided a random sample of the mutants
    random.Random(0).shuffle(todo)
    todo = again + todo  # survivors first, against the tests added since
    print(f"{len(mutants)} mutants, {len(todo)} to run", flush=True)
    _preload()
    t0 = time.time()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pool = Pool(args.jobs, args.tests, args.timeout, Path(tmp))
        # the unmutated tree must pass, or every mutant looks killed; its run maps tests to lines
        covered_json = Path(tmp) / "covered.json"
        pool.start(None, coverage_out=covered_json)
        if pool.wait_one()[1] != "survived":
            raise SystemExit("the tests fail on the unmutated tree: fix them first")
        covered = json.loads(covered_json.read_text())
        queue, done, ran = list(todo), 0, {}
        while queue or pool.running:
            while queue and pool.free:
                m = queue.pop(0)
                ran[m.digest] = _tests_for(m, covered, args.tests)
                pool.start(m, ran[m.digest])
            m, outcome = pool.wait_one()
            done += 1
            logged[m.digest] = {"digest": m.digest, "key": m.key, "path": m.path,
                                "function": m.function, "line": m.line, "what": m.what,
                                "code": m.code, "outcome": outcome,
                                "tests": ("all" if ran[m.digest] is args.tests
                                          else len(ran[m.digest]))}
            with args.log.open("a") as fh:
                fh.write(json.dumps(logged[m.digest]) + "\n")
            print(f"[{done}/{len(todo)}] {m.path}:{m.line} {m.function}: {m.what}: {outcome}",
                  flush=True)
    results = [(m, logged[m.digest]["outcome"]) for m in mutants if m.digest in logged]
    body = _report(results, targets, args.tests, time.time() - t0, len(mutants))
    print(body)
    if args.write_results:
        _write(body)


def _report(results, targets, tests, seconds, total) -> str:
    explained = _explained()
    from kvbound.eval.stats import wilson_interval

    killed = sum(o != "survived" for _, o in results)
    score = 100.0 * killed / max(len(results), 1)
    survivors = [m for m, o in results if o == "survived"]
    unexplained = [m for m in survivors if m.key not in explained]
    kinds = {k: sum(1 for m in survivors if explained.get(m.key, {}).get("kind") == k)
             for k in KINDS}
    killable = len(results) - kinds["equivalent"]
    standard = 100.0 * killed / max(killable, 1)
    lo, hi = wilson_interval(killed, killable) if killable else (0.0, 0.0)
    sample = "" if len(results) == total else (
        f" The run decided a seeded random sample of {len(results)} of the {total} mutants; "
        f"95% Wilson interval of the standard score over all of them: "
        f"{100 * lo:.1f}-{100 * hi:.1f}%.")
    by_file: dict[str, list[int]] = {}
    for m, o in results:
        k = by_file.setdefault(m.path, [0, 0])
        k[0] += o != "survived"
        k[1] += 1
    rows = [f"| `{p}` | {k} / {n} | {100.0 * k / n:.0f}% |" for p, (k, n) in sorted(by_file.items())]
    return "\n".join([
        "## Mutation testing of the engine", "",
        f"Command: `{command()}`  ", f"Machine: {machine()}", "",
        f"Targets: {', '.join(targets)}; tests: `{' '.join(tests)}` (each mutant runs the tests "
        "of this set that execute its function on the unmodified tree, by per-test coverage, or "
        f"the whole set where none does); {len(results)} of {total} mutants decided"
        + (f" ({seconds:.0f} s in the last run)." if seconds else "."), "",
        f"**Mutation score: {standard:.1f}%** ({killed} killed of {killable} killable mutants: "
        f"the {kinds['equivalent']} equivalent survivors, which no test can kill, are left out "
        f"of the denominator, the usual definition); raw: {score:.1f}% ({killed} of "
        f"{len(results)}). Survivors: {kinds['equivalent']} equivalent, {kinds['benign']} benign "
        f"(observable, but no result depends on them), {kinds['compile-only']} "
        f"checked only by the compile tests (left out of this test set for time), "
        f"{kinds['killed-later']} killed by a test added after the run decided them (counted as "
        f"survivors until re-run), {len(unexplained)} unexplained.{sample}", "",
        "| file | killed | score |", "|---|---|---|", *rows, "",
        "| surviving mutant | where | kind | why it survives |", "|---|---|---|---|",
        *[f"| {m.what} in `{_cell(m.code)}` | `{m.path}:{m.line}` ({m.function}) | "
          f"{explained.get(m.key, {}).get('kind', '**unexplained**')} | "
          f"{explained.get(m.key, {}).get('why', '')} |" for m in survivors],
        "",
    ])


def _cell(code: str) -> str:
    return code.replace("|", "\\|")


def _write(body: str) -> None:
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
