"""Exactness across computation shapes must not depend on the CPU's kernels or thread count.

Re-runs every ``portability``-marked test (batch == rows alone, static == dynamic, batched ==
single windows, tie decisions) in fresh processes under other kernels: ATen's AVX2 and scalar
paths (``ATEN_CPU_CAPABILITY``), MKL's GEMM code paths of other CPUs (``MKL_CBWR``: the rounding
an Intel Xeon's kernels give differs from an AMD EPYC's; ``COMPATIBLE`` and ``AVX`` reproduce the
K-norm batch mismatch seen on a Xeon before ties were decided with a tolerance) and two threads
(another reduction split).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "aten-avx2-mkl-compatible-1thread": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE",
                                         "KVBOUND_TEST_THREADS": "1"},
    "mkl-avx-2threads": {"MKL_CBWR": "AVX", "KVBOUND_TEST_THREADS": "2"},
    "aten-scalar-1thread": {"ATEN_CPU_CAPABILITY": "default", "KVBOUND_TEST_THREADS": "1"},
}


@pytest.mark.skipif(os.environ.get("KVBOUND_PORTABILITY_RERUN") == "1", reason="inside a re-run")
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_exactness_holds_under_other_kernels_and_threads(setting):
    env = {**os.environ, **SETTINGS[setting], "KVBOUND_PORTABILITY_RERUN": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "-m", "portability", "tests"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"{setting}:\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
