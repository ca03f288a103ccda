"""Test setup: tiny models run on one thread (faster than two for tiny ops and no contention);
integration tests on the embedded model use every core. The Hub is never contacted."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _threads(request):
    integration = request.node.get_closest_marker("integration") is not None
    torch.set_num_threads(_THREADS if integration else 1)
    yield
    torch.set_num_threads(_THREADS)
