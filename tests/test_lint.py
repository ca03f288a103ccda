"""Rules for the suite itself: inputs from local generators, no timing thresholds, and
``pytest.raises`` on our base error class always with ``match=``."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
RANDOM_CALL = re.compile(r"torch\.(randint|randn|rand|randperm|normal)\(")
SOURCES = sorted(p for p in TESTS.rglob("*.py") if p.name != "test_lint.py")


def _calls(text: str, pattern: re.Pattern):
    for m in pattern.finditer(text):
        j, depth = m.end(), 1
        while depth and j < len(text):
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            j += 1
        yield text.count("\n", 0, m.start()) + 1, text[m.start():j]


def test_no_test_input_comes_from_the_global_rng():
    bad = [f"{p.relative_to(TESTS)}:{line}" for p in SOURCES
           for line, call in _calls(p.read_text(), RANDOM_CALL) if "generator=" not in call]
    assert not bad, f"draw test inputs from tests.rng.gen(seed): {bad}"


def test_no_bare_raises_on_the_base_error_class():
    pattern = re.compile(r"pytest\.raises\(\s*KVBoundError\s*[,)]")
    bad = [f"{p.relative_to(TESTS)}:{line}" for p in SOURCES
           for line, call in _calls(p.read_text(), re.compile(r"pytest\.raises\("))
           if pattern.match(call) and "match=" not in call]
    assert not bad, f"KVBoundError catches every user error: give match=: {bad}"


def test_no_wall_clock_thresholds():
    pattern = re.compile(r"assert .*(elapsed|seconds|perf_counter\(\)|time\.time\(\)) *[<>]")
    bad = [f"{p.relative_to(TESTS)}:{i}" for p in SOURCES
           for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not bad, f"timing belongs in benchmarks/: {bad}"
