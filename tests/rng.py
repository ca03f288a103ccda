"""Test inputs come from local generators, never the global RNG (tests/test_lint.py checks)."""

from __future__ import annotations

import torch


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
