"""Test setup: tiny models run on one thread (faster than two for tiny ops and no contention;
``KVBOUND_TEST_THREADS`` overrides it, see test_portability.py); integration tests on the
embedded model use every core. The Hub is never contacted."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# the same examples on every run and machine (pytest-randomly's seed does not change them)
settings.register_profile("kvbound", derandomize=True, database=None)
settings.load_profile("kvbound")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_THREADS = torch.get_num_threads()
_TINY_THREADS = int(os.environ.get("KVBOUND_TEST_THREADS", "1"))


@pytest.fixture(autouse=True)
def _isolated_global_rng():
    """Each test starts from the same global RNG state and leaves it as it was (sampling inside
    model.generate draws from it; test inputs come from tests.rng.gen)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@pytest.fixture(autouse=True)
def _threads(request):
    integration = request.node.get_closest_marker("integration") is not None
    torch.set_num_threads(_THREADS if integration else _TINY_THREADS)
    yield
    torch.set_num_threads(_THREADS)
